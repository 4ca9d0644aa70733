"""juicecache: Prefect task caching shared by every machine that mounts the same JuiceFS volume."""
