"""The storage backends under test, set up on this machine by the benchmark and torn down after.

Everything lives in one throwaway folder and on free loopback ports:

- `local`: a folder on the local disk (the floor every other backend is compared to);
- `jfs-sqlite`: JuiceFS with SQLite metadata and a local folder as object storage (the embedded default);
- `jfs-s3`: JuiceFS with Redis metadata and S3 object storage (the shared profile), on the
  project's own local stack (redis-server + SeaweedFS S3, `juicecache.devstack`);
- `jfs-pg`: the same with PostgreSQL metadata (the PostgreSQL profile), on the same stack's
  PostgreSQL (a volume per profile: the cloud one in its own schema, `&search_path=cloud`);
- `s3fs`: the same S3 bucket mounted with s3fs-fuse, the "mounted S3 volume" alternative;
- `s3-direct`: Prefect writing results straight to the bucket through fsspec/s3fs (no mount).

In the cloud-like profile the S3, Redis and PostgreSQL clients reach the stack through the delay proxy
(`bench.proxy`), so every backend but the two local ones pays a network round trip.
The JuiceFS backends get a second mount of the same volume, with its own cache folder:
the second client, for the cold-hit measurement.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from juicecache.devstack.stack import REGION, StackConfig, free_ports, postgres_sql, start_stack, stop_stack
from juicecache.settings import Settings, load_settings
from juicecache.volume import mount_volume, unmount_volume

RESULTS_DIR = "prefect-cache"
# Loopback-only emulated latency of the cloud-like profile (one way; a round trip is twice this).
S3_DELAY_MS = 10.0
REDIS_DELAY_MS = 0.5


@dataclass(frozen=True)
class Backend:
    """What a measuring process needs to know about one backend (sent to it as JSON)."""

    slug: str
    name: str
    kind: str  # "folder": a cache folder juicecache writes to; "s3": Prefect's RemoteFileSystem on the bucket
    root: str  # the cache folder, or s3://bucket/prefix
    volume_name: str | None = None  # a JuiceFS volume: `root` is on its mount
    mount_point: str | None = None
    second_mount_point: str | None = None  # the second client's mount of the same volume
    endpoint: str | None = None  # S3 endpoint URL, for kind "s3"

    @property
    def is_juicefs(self) -> bool:
        return self.volume_name is not None

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Profile:
    name: str  # "loopback" or "cloud"
    backends: list[Backend]
    redis_port: int  # what clients connect to (the stack, or the proxy in front of it)
    s3_port: int
    postgres_port: int


class Lab:
    """The stack, the proxy and every mount of one benchmark run; `close()` removes them all."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.exits = ExitStack()
        self.secret_key = secrets.token_hex(16)
        self.redis_password = secrets.token_hex(12)
        self.postgres_password = secrets.token_hex(12)
        self.stack = StackConfig.for_tests(
            workdir / "stack", postgres=True, redis_password=self.redis_password, postgres_password=self.postgres_password,
            secret_key=self.secret_key,
        )
        self.base = self._base_settings()

    def close(self) -> None:
        self.exits.close()

    def _base_settings(self) -> Settings:
        (self.workdir / "empty.env").write_text("")
        os.environ["JUICECACHE_ENV_FILE"] = str(self.workdir / "empty.env")
        return load_settings(self.workdir)

    def s3_env(self) -> dict[str, str]:
        """Credentials for S3 clients, in their environment (never on a command line)."""
        return {"AWS_ACCESS_KEY_ID": self.stack.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_DEFAULT_REGION": REGION}

    def start_stack(self) -> None:
        self.exits.callback(stop_stack, self.stack)
        start_stack(self.stack)

    def start_proxy(self) -> tuple[int, int, int]:
        """The delay proxy in front of Redis, S3 and PostgreSQL; returns (redis port, s3 port, postgres port) to use.
        PostgreSQL gets Redis's delay: both are the metadata engine, a LAN hop away."""
        base = free_ports(3)
        routes = [f"{base}:{self.stack.redis_port}:{REDIS_DELAY_MS}", f"{base + 1}:{self.stack.s3_port}:{S3_DELAY_MS}",
                  f"{base + 2}:{self.stack.postgres_port}:{REDIS_DELAY_MS}"]
        proxy = subprocess.Popen(
            [sys.executable, "-m", "bench.proxy", *routes], stdout=subprocess.PIPE, text=True,
            cwd=Path(__file__).resolve().parent.parent,
        )
        self.exits.callback(_stop_process, proxy)
        if proxy.stdout is None or proxy.stdout.readline().strip() != "ready":
            raise RuntimeError("the latency proxy did not start")
        return base, base + 1, base + 2

    def profile(self, name: str, redis_port: int, s3_port: int, postgres_port: int, embedded: Backend) -> Profile:
        endpoint = f"http://{self.stack.host}:{s3_port}"
        pg_url = f"postgres://{self.stack.postgres_user}@{self.stack.host}:{postgres_port}/{self.stack.postgres_db}?sslmode=disable"
        if name != "loopback":  # one volume per database or schema
            postgres_sql(self.stack, f"CREATE SCHEMA IF NOT EXISTS {name} AUTHORIZATION {self.stack.postgres_user};", self.stack.postgres_db)
            pg_url += f"&search_path={name}"
        backends = [
            self.local_folder(name),
            embedded,
            self.juicefs(f"shared-{name}", f"redis://{self.stack.host}:{redis_port}/{1 if name == 'loopback' else 2}",
                         "s3", f"{endpoint}/{self.stack.bucket}", slug="jfs-s3", title="JuiceFS Redis+S3"),
            self.juicefs(f"pg-{name}", pg_url, "s3", f"{endpoint}/{self.stack.bucket}", slug="jfs-pg", title="JuiceFS PostgreSQL+S3"),
            self.s3fs_fuse(name, endpoint),
            Backend("s3-direct", "S3 direct (fsspec)", "s3", f"s3://{self.stack.bucket}/direct-{name}", endpoint=endpoint),
        ]
        return Profile(name, backends, redis_port, s3_port, postgres_port)

    def local_folder(self, profile: str) -> Backend:
        root = self.workdir / "local" / profile / RESULTS_DIR
        root.mkdir(parents=True)
        return Backend("local", "local disk", "folder", str(root))

    def juicefs(self, volume: str, meta_url: str, storage: str, bucket: str, slug: str, title: str) -> Backend:
        """Format the volume, mount it twice (two clients, each with its own cache folder)."""
        mounts = [self.workdir / volume / f"mnt-{client}" for client in ("a", "b")]
        for client, mount_point in zip(("a", "b"), mounts, strict=True):
            settings = self.volume_settings(volume, meta_url, storage, bucket, mount_point, client)
            self.exits.callback(_unmount, settings)
            mount_volume(settings)
        return Backend(
            slug, title, "folder", str(mounts[0] / RESULTS_DIR), volume_name=volume,
            mount_point=str(mounts[0]), second_mount_point=str(mounts[1]),
        )

    def volume_settings(self, volume: str, meta_url: str, storage: str, bucket: str, mount_point: Path, client: str) -> Settings:
        shared = storage == "s3"
        if not shared:
            Path(bucket).mkdir(parents=True, exist_ok=True)
        return replace(
            self.base, volume_name=volume, meta_url=meta_url, storage=storage, bucket=bucket,
            mount_point=mount_point, cache_dir=self.workdir / volume / f"cache-{client}",
            access_key=self.stack.access_key if shared else "", secret_key=self.secret_key if shared else "",
            meta_password={"redis": self.redis_password, "postgres": self.postgres_password}.get(meta_url.split("://")[0], ""),
            mount_options=tuple(os.environ.get("BENCH_JFS_MOUNT_OPTIONS", "").split()),
        )

    def s3fs_fuse(self, profile: str, endpoint: str) -> Backend:
        mount_point = self.workdir / f"s3fs-{profile}"
        mount_point.mkdir()
        passwd = self.workdir / f"s3fs-{profile}.passwd"
        fd = os.open(passwd, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(f"{self.stack.access_key}:{self.secret_key}\n")
        binary = shutil.which("s3fs")
        if binary is None:
            raise RuntimeError("s3fs not found: apt-get install s3fs (make bench installs it)")
        self.exits.callback(_fuse_unmount, mount_point)
        subprocess.run(
            [binary, self.stack.bucket, str(mount_point), "-o", f"url={endpoint}", "-o", "use_path_request_style",
             "-o", f"passwd_file={passwd}", "-o", f"endpoint={REGION}", "-o", "dbglevel=warn",
             "-o", f"logfile={self.workdir / f's3fs-{profile}.log'}"],
            check=True, timeout=60, capture_output=True,
        )
        if not _wait(lambda: os.path.ismount(mount_point), 30):
            raise RuntimeError(f"s3fs did not mount (see {self.workdir / f's3fs-{profile}.log'})")
        root = mount_point / f"s3fs-{profile}" / RESULTS_DIR
        root.mkdir(parents=True)
        return Backend("s3fs", "s3fs-fuse mount", "folder", str(root), mount_point=str(mount_point))


@contextmanager
def lab(workdir: Path) -> Iterator[Lab]:
    built = Lab(workdir)
    try:
        yield built
    finally:
        built.close()


def _unmount(settings: Settings) -> None:
    with contextlib.suppress(Exception):
        unmount_volume(settings)
    if os.path.ismount(settings.mount_point):
        subprocess.run(["umount", "-l", str(settings.mount_point)], capture_output=True, timeout=30)


def _fuse_unmount(mount_point: Path) -> None:
    if os.path.ismount(mount_point):
        subprocess.run(["fusermount", "-u", str(mount_point)], capture_output=True, timeout=60)
    if os.path.ismount(mount_point):
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True, timeout=30)


def _stop_process(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _wait(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()
