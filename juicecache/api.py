"""What a flow may ask juicecache, without importing Prefect: its settings and where results go.

`juicecache/__init__.py` serves these (and `cached_task`) lazily, so the command line can
import the package cheaply and set Prefect's environment before Prefect is imported.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from juicecache.settings import Settings, apply_prefect_settings, load_settings
from juicecache.volume import VolumeError, cache_location


@dataclass(frozen=True)
class VolumeStatus:
    """Where this process's cached results go, and whether other machines share them."""

    mounted: bool  # the configured JuiceFS volume is mounted and answering: results are shared
    volume_name: str  # the configured volume (JFS_NAME)
    mount_point: Path  # where this machine mounts it (JFS_MOUNT_POINT)
    results_path: Path | None  # the cache folder in use; None when the cache cannot be used (see warning)
    warning: str | None  # why results are not shared, or why the cache cannot be used


def get_settings(root: Path | None = None) -> Settings:
    """The settings juicecache caches with in this process.

    `.env` in `root` (default: JUICECACHE_ROOT, else the current folder), the environment
    winning over it; once a cached task has run, the settings it resolved.
    """
    cache = _loaded_cache_module()
    active = cache.activated() if cache and root is None else None
    return active.settings if active else load_settings(root)


def volume_status(settings: Settings | None = None) -> VolumeStatus:
    """Is the volume mounted, and where do results go? Never mounts, writes or warns."""
    cache = _loaded_cache_module()
    active = cache.activated() if cache and settings is None else None
    settings = active.settings if active else settings or load_settings()
    if active:
        location = active.location
    else:
        try:
            location = cache_location(settings)
        except VolumeError as exc:  # a dead mount, or another volume at the mount point
            return VolumeStatus(False, settings.volume_name, settings.mount_point, None, str(exc))
    return VolumeStatus(location.on_volume, settings.volume_name, settings.mount_point, location.path, location.warning)


def load_cache_module() -> ModuleType:
    """`juicecache.cache`, with juicecache's Prefect settings applied first if Prefect is not loaded yet.

    Prefect reads its settings (PREFECT_HOME, PREFECT_API_URL...) when it is imported;
    a flow that imports Prefect first keeps Prefect's own settings.
    """
    if "prefect" not in sys.modules:
        apply_prefect_settings(load_settings())
    import juicecache.cache

    return juicecache.cache


def _loaded_cache_module() -> ModuleType | None:
    return sys.modules.get("juicecache.cache")
