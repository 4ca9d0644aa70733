"""A local shared stack for development, tests and benchmarks: redis or PostgreSQL + SeaweedFS S3.

JuiceFS needs a metadata engine and an object store that every machine can reach. This
module runs real ones as plain background processes (not system services), each with a
pid file and a log file under `data_dir`, so a stack can be started, stopped and thrown
away without root-owned state:

- `redis-server` (metadata), configured through a 0600 file so a password never shows
  in `ps`; append-only file on, so metadata survives a restart.
- or PostgreSQL (`postgres://` in JFS_META_URL: the PostgreSQL profile), from Debian's
  `postgresql` package, with its own cluster (initdb) under `data_dir/postgres`, owned by
  and run as the `postgres` user when we are root (PostgreSQL refuses to run as root). It
  holds two databases: JuiceFS's metadata and the Prefect server's. Role passwords are set
  as SCRAM verifiers through psql's stdin: no password on a command line or in its logs.
  Passwords not given in the settings are generated into 0600 files beside it.
- SeaweedFS as two processes: `weed server` (master, volume, filer) and `weed s3` (the
  S3 gateway, with real SigV4 auth from a 0600 identities file), so the gateway can be
  stopped first (see `stop_stack`).

Every port is pinned (SeaweedFS otherwise derives gRPC ports as HTTP port + 10000 and
opens Iceberg/Lance ports) and telemetry is off: nothing phones home. IPv4 only.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import hmac
import http.client
import ipaddress
import json
import os
import pwd
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import unicodedata
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from juicecache.settings import STATE_DIR, Settings

REGION = "us-east-1"  # SeaweedFS accepts any region in SigV4; JuiceFS signs with this one
WEED_GRACE = 2.0  # seconds `weed server` gets to stop cleanly before SIGKILL (see stop_stack)
_children: dict[int, subprocess.Popen] = {}  # processes we spawned, so we can reap them
PREFECT_DB = "prefect"  # the Prefect server's role and database in the PostgreSQL profile
PREFECT_PASSWORD_ENV = "PREFECT_SERVER_DATABASE_PASSWORD"  # Prefect templates it into its database URL
_PG_SOCKET_MAX = 100  # a unix socket path is at most 107 bytes; PostgreSQL adds /.s.PGSQL.NNNNN


class StackError(Exception):
    """The stack cannot be started or described; the message is one human line."""


@dataclass(frozen=True)
class StackConfig:
    """Where the stack lives and listens.

    SeaweedFS ports are derived from `s3_port` (all pinned, see `weed_ports`), so a stack
    occupies `s3_port`..`s3_port + 7` plus `redis_port` and/or `postgres_port`.
    `redis_port` None: no redis; `postgres_port` set: a PostgreSQL (the PostgreSQL profile).
    """

    data_dir: Path
    host: str = "127.0.0.1"
    redis_port: int | None = 6390
    redis_password: str | None = None
    s3_port: int = 8333
    bucket: str = "juicecache"
    access_key: str = "juicecache"
    secret_key: str = "juicecache-secret"
    postgres_port: int | None = None
    postgres_user: str = "juicefs"  # JuiceFS's role and database
    postgres_db: str = "juicefs"
    postgres_password: str | None = None  # the JuiceFS role's (META_PASSWORD); None: generated into a 0600 file
    prefect_db_password: str | None = None  # the Prefect role's; None: generated into a 0600 file

    @property
    def weed_ports(self) -> dict[str, int]:
        """s3_port+1..+3: master/volume/filer HTTP; +4..+7: master/volume/filer/S3 gRPC."""
        names = ("master", "volume", "filer", "master.grpc", "volume.grpc", "filer.grpc", "s3.grpc")
        return {name: self.s3_port + i for i, name in enumerate(names, start=1)}

    @property
    def meta_url(self) -> str:
        """Without the password: give JuiceFS that as META_PASSWORD (argv is public). Redis's if
        the stack runs one, else PostgreSQL's."""
        return f"redis://{self.host}:{self.redis_port}/1" if self.redis_port else self.postgres_meta_url

    @property
    def postgres_meta_url(self) -> str:
        """JuiceFS's metadata on the stack's PostgreSQL (no TLS on loopback or a private network)."""
        return f"postgres://{self.postgres_user}@{self.host}:{self.postgres_port}/{self.postgres_db}?sslmode=disable"

    @property
    def prefect_database_url(self) -> str:
        """PREFECT_SERVER_DATABASE_CONNECTION_URL for the Prefect server: Prefect fills the
        password in from PREFECT_SERVER_DATABASE_PASSWORD, so the URL itself holds none."""
        return f"postgresql+asyncpg://{PREFECT_DB}:${{{PREFECT_PASSWORD_ENV}}}@{self.host}:{self.postgres_port}/{PREFECT_DB}"

    @property
    def postgres_dir(self) -> Path:
        """The PostgreSQL cluster (PGDATA), owned by the user PostgreSQL runs as; its socket too."""
        return self.data_dir / "postgres"

    def password_file(self, role: str) -> Path:
        """Where a generated PostgreSQL role password is kept (0600)."""
        return self.data_dir / f"postgres-{role}.password"

    @property
    def services(self) -> tuple[str, ...]:
        """What this stack runs, as `stack_running` names it."""
        return (*(("redis",) if self.redis_port else ()), *(("postgres",) if self.postgres_port else ()), "s3")

    @property
    def bucket_url(self) -> str:
        return f"http://{self.host}:{self.s3_port}/{self.bucket}"

    @classmethod
    def from_urls(cls, meta_url: str, bucket_url: str, access_key: str, secret_key: str, data_dir: Path) -> StackConfig:
        """The stack that serves these JuiceFS settings (only local-ish hosts: we bind them)."""
        meta, bucket = urlsplit(meta_url), urlsplit(bucket_url)
        if meta.scheme not in ("redis", "postgres"):
            raise StackError(f"the local stack serves redis:// or postgres:// metadata, not {meta.scheme or meta_url!r}")
        if bucket.scheme != "http":
            raise StackError(f"the local stack serves plain http:// S3, not {bucket.scheme or bucket_url!r}")
        if meta.scheme == "redis" and meta.username not in (None, "", "default"):
            raise StackError("the local stack's redis has no ACL users: use redis://:PASSWORD@host:port/db")
        name = bucket.path.strip("/")
        if not name or "/" in name:
            raise StackError(f"bucket URL must be http://host:port/BUCKET, got {bucket_url!r}")
        if meta.hostname != bucket.hostname:
            raise StackError(f"redis ({meta.hostname}) and S3 ({bucket.hostname}) must share one host to run locally")
        host = "127.0.0.1" if meta.hostname == "localhost" else meta.hostname or ""
        _check_local(host)
        if meta.scheme == "postgres":
            user, db = meta.username or "", meta.path.strip("/")
            if not (_PG_NAME.fullmatch(user) and _PG_NAME.fullmatch(db)) or user == PREFECT_DB or db == PREFECT_DB:
                raise StackError(
                    "the local stack's PostgreSQL URL is postgres://USER@HOST:PORT/DATABASE?sslmode=disable "
                    f"(USER and DATABASE: a-z, 0-9, _; not {PREFECT_DB!r}, the Prefect server's)"
                )
            if parse_qs(meta.query).get("sslmode") != ["disable"]:
                raise StackError("the local stack's PostgreSQL has no TLS: add ?sslmode=disable to JFS_META_URL")
            return cls(
                data_dir=Path(data_dir), host=host, redis_port=None, postgres_port=meta.port or 5432,
                postgres_user=user, postgres_db=db, postgres_password=unquote(meta.password) if meta.password else None,
                s3_port=bucket.port or 80, bucket=name, access_key=access_key, secret_key=secret_key,
            )
        return cls(
            data_dir=Path(data_dir), host=host, redis_port=meta.port or 6379,
            redis_password=unquote(meta.password) if meta.password else None,
            s3_port=bucket.port or 80, bucket=name, access_key=access_key, secret_key=secret_key,
        )

    @classmethod
    def for_tests(cls, data_dir: Path, host: str = "127.0.0.1", postgres: bool = False, **overrides) -> StackConfig:
        """A stack on free ports (redis at the base of a free block of 10, S3 right after, and
        with `postgres`, PostgreSQL at its end; `redis_port=None` leaves redis out)."""
        base = free_ports(10, host)
        ports = {"redis_port": base, "s3_port": base + 1, **({"postgres_port": base + 9} if postgres else {})}
        return cls(data_dir=Path(data_dir), host=host, **{**ports, **overrides})


_PG_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")


def stack_config(settings: Settings) -> StackConfig:
    """The local stack serving the shared profile in these settings (data under .juicecache/stack)."""
    if settings.storage != "s3" or not settings.meta_url.startswith(("redis://", "postgres://")):
        raise StackError(
            "the local stack serves the shared profile: set JFS_META_URL=redis://... (or postgres://...), "
            "JFS_STORAGE=s3 and JFS_BUCKET=http://... (see .env.example)"
        )
    if not settings.access_key or not settings.secret_key:
        raise StackError("the local stack needs JFS_ACCESS_KEY and JFS_SECRET_KEY: its S3 checks them")
    config = StackConfig.from_urls(
        settings.meta_url, settings.bucket, settings.access_key, settings.secret_key, settings.root / STATE_DIR / "stack"
    )
    if config.postgres_port:
        prefect_password = os.environ.get(PREFECT_PASSWORD_ENV, "").strip() or None
        if config.postgres_password is None and settings.meta_password:
            config = replace(config, postgres_password=settings.meta_password)
        return replace(config, prefect_db_password=prefect_password)
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
    """Which parts answer: redis PINGs (with our password), PostgreSQL accepts connections,
    the S3 gateway serves HTTP (only the parts `cfg` runs, see `StackConfig.services`)."""
    weed_up = _alive(cfg, "weed") is not None and _alive(cfg, "s3") is not None
    running = {
        "redis": cfg.redis_port is not None and _alive(cfg, "redis") is not None and _redis_pings(cfg),
        "postgres": cfg.postgres_port is not None and _alive(cfg, "postgres") is not None and _pg_ready(cfg),
        "s3": weed_up and _http_answers(cfg.host, cfg.s3_port),
    }
    return {name: running[name] for name in cfg.services}


def start_stack(cfg: StackConfig, timeout: float = 60) -> None:
    """Start whatever is not running yet, wait until it all answers, create the bucket."""
    deadline = time.monotonic() + timeout
    _check_local(cfg.host)
    ports = cfg.weed_ports
    needs = {
        **({"redis": [cfg.redis_port]} if cfg.redis_port else {}),
        **({"postgres": [cfg.postgres_port]} if cfg.postgres_port else {}),
        "weed": [port for name, port in ports.items() if name != "s3.grpc"],
        "s3": [cfg.s3_port, ports["s3.grpc"]],
    }
    todo = [name for name in needs if _alive(cfg, name) is None]
    redis_server = _redis_binary() if "redis" in todo else ""
    pg = _PgRunner(cfg) if cfg.postgres_port else None
    weed = _weed_binary() if {"weed", "s3"} & set(todo) else ""
    for name in todo:  # all checks before any spawn: a refused start leaves nothing behind
        for port in needs[name]:
            if not _port_free(cfg.host, port):
                raise StackError(f"port {port} on {cfg.host} (for {name}) is in use by another process")
    cfg.data_dir.mkdir(parents=True, exist_ok=True)
    weed_dir = cfg.data_dir / "weed"
    if "redis" in todo:
        _spawn(cfg, "redis", [redis_server, str(_write_redis_conf(cfg))])
    if pg is not None and "postgres" in todo:
        pg.init_cluster()
        pg.spawn()
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
    if cfg.redis_port:
        _wait(cfg, "redis", lambda: _redis_pings(cfg, strict=True), deadline)
    if pg is not None:
        _wait(cfg, "postgres", lambda: _pg_ready(cfg), deadline)
        pg.create_databases()  # every time: a changed password takes effect
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
    _stop(cfg, ("s3", "redis", "postgres"), deadline)
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
        raise StackError("weed (SeaweedFS) not found: pip install 'juicecache[devstack]'")
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


def _spawn(cfg: StackConfig, name: str, argv: list[str], **popen) -> None:
    with open(cfg.data_dir / f"{name}.log", "ab") as log:
        proc = subprocess.Popen(
            argv, cwd=cfg.data_dir, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group: a Ctrl-C in our terminal does not reach it
            **popen,
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
    return pid if {"redis": b"redis-server", "postgres": b"postgres"}.get(name, b"weed") in cmdline else None


def _wait(cfg: StackConfig, name: str, ready, deadline: float) -> None:
    while not ready():
        if _alive(cfg, name) is None:
            raise StackError(f"{name} exited while starting; see {cfg.data_dir / (name + '.log')}")
        if time.monotonic() > deadline:
            raise StackError(f"{name} did not become ready in time; see {cfg.data_dir / (name + '.log')}")
        time.sleep(0.1)


def _stop(cfg: StackConfig, names: tuple[str, ...], deadline: float) -> None:
    """SIGTERM each process group, wait for all of them until `deadline`, then SIGKILL.

    PostgreSQL gets SIGINT, to its postmaster alone (a "fast" shutdown, as `pg_ctl stop`
    does: it disconnects clients and writes a checkpoint; SIGTERM would wait for every
    client, a JuiceFS mount or the Prefect server, to leave)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for name in names:
            pid = _alive(cfg, name)
            if pid is None:
                continue
            with contextlib.suppress(ProcessLookupError):
                if name == "postgres" and sig == signal.SIGTERM:
                    os.kill(pid, signal.SIGINT)
                else:
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


# --- PostgreSQL (the PostgreSQL profile) ---------------------------------------------


def _postgres_bindir() -> Path:
    """The newest PostgreSQL server installed the Debian way (/usr/lib/postgresql/N/bin), else PATH's."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0)
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    if initdb and (Path(initdb).parent / "postgres").exists():
        return Path(initdb).parent
    raise StackError("PostgreSQL not found: install it: apt-get install postgresql")


def _pg_ready(cfg: StackConfig) -> bool:
    """Whether PostgreSQL accepts connections on its TCP port (pg_isready: no login, no password)."""
    try:
        bindir = _postgres_bindir()
    except StackError:
        return False
    done = subprocess.run(
        # as JuiceFS's role: pg_isready stops at the password request, which PostgreSQL does not
        # log (an unknown role/database pair would log a FATAL line per probe)
        [str(bindir / "pg_isready"), "-q", "-h", cfg.host, "-p", str(cfg.postgres_port), "-t", "2",
         "-U", cfg.postgres_user, "-d", cfg.postgres_db],
        env={"PATH": os.defpath}, capture_output=True, timeout=10,
    )
    return done.returncode == 0


def scram_verifier(password: str, iterations: int = 4096) -> str:
    """The SCRAM-SHA-256 verifier PostgreSQL stores for `password` (what `PASSWORD '...'` turns
    it into itself): sent instead of the password, so not even a failed statement in
    PostgreSQL's log can show it. NFKC stands in for SASLprep (identical for ASCII)."""
    salt = os.urandom(16)
    salted = hashlib.pbkdf2_hmac("sha256", unicodedata.normalize("NFKC", password).encode(), salt, iterations)
    stored = hashlib.sha256(hmac.new(salted, b"Client Key", hashlib.sha256).digest()).digest()
    server = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
    b64 = base64.b64encode
    return f"SCRAM-SHA-256${iterations}:{b64(salt).decode()}${b64(stored).decode()}:{b64(server).decode()}"


def postgres_password(cfg: StackConfig, role: str) -> tuple[str, Path | None]:
    """A role's password: the one the settings give, else the one generated (once) into its
    0600 file. The file is returned when the password comes from it."""
    given = cfg.postgres_password if role == cfg.postgres_user else cfg.prefect_db_password
    if given:
        return given, None
    path = cfg.password_file(role)
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        text = ""
    if not text:
        cfg.data_dir.mkdir(parents=True, exist_ok=True)
        text = secrets.token_urlsafe(24)
        _write_private(path, text + "\n")
    return text, path


def _sql_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


class _PgRunner:
    """initdb, the postmaster and psql, run as the user PostgreSQL runs as: `postgres` when
    we are root (it refuses root), else ourselves. Admin connections go through the unix
    socket in PGDATA with peer authentication: the superuser has no password at all."""

    def __init__(self, cfg: StackConfig) -> None:
        self.cfg = cfg
        self.bindir = _postgres_bindir()
        if os.geteuid() == 0:
            try:
                account = pwd.getpwnam("postgres")
            except KeyError:
                raise StackError("PostgreSQL refuses to run as root and there is no user postgres: apt-get install postgresql") from None
            self.popen = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}
            self.owner = (account.pw_uid, account.pw_gid)
            self.superuser = "postgres"
        else:
            self.popen = {}
            self.owner = None
            self.superuser = pwd.getpwuid(os.geteuid()).pw_name
        # Nothing of ours (META_PASSWORD, S3 keys) in PostgreSQL's environment.
        self.env = {"PATH": os.defpath, "LC_ALL": "C", "TZ": "UTC"}
        socket_path = f"{cfg.postgres_dir}/.s.PGSQL.{cfg.postgres_port}"
        if len(socket_path) > _PG_SOCKET_MAX:
            raise StackError(f"PostgreSQL's socket path would be too long ({socket_path}): put the project in a shorter folder")

    def _run(self, argv: list[str], what: str, stdin: str | None = None, timeout: float = 120) -> str:
        done = subprocess.run(
            argv, input=stdin, env=self.env, capture_output=True, text=True, timeout=timeout,
            cwd=self.cfg.postgres_dir, **self.popen,
        )
        if done.returncode != 0:
            lines = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()] or ["no output"]
            reason = re.sub(r"SCRAM-SHA-256\$[^'\s]+", "SCRAM-SHA-256$****", lines[-1].strip())
            raise StackError(f"PostgreSQL {what} failed: {reason}; see {self.cfg.data_dir / 'postgres.log'}")
        return done.stdout

    def init_cluster(self) -> None:
        """initdb once (PGDATA owned by the PostgreSQL user, 0700); pg_hba.conf every time."""
        pgdata = self.cfg.postgres_dir
        pgdata.mkdir(mode=0o700, exist_ok=True)
        if self.owner is not None:
            os.chown(pgdata, *self.owner)
        probe = subprocess.run(["test", "-w", str(pgdata)], env=self.env, capture_output=True, **self.popen)
        if probe.returncode != 0:
            raise StackError(
                f"PostgreSQL runs as user {self.superuser}, who cannot reach {pgdata}: "
                "let it through the folders above (chmod o+x) or put the project elsewhere"
            )
        if not (pgdata / "PG_VERSION").exists():
            self._run([
                str(self.bindir / "initdb"), "-D", str(pgdata), "-U", self.superuser, "-E", "UTF8", "--locale=C",
                "--auth-local=peer", "--auth-host=scram-sha-256", "--no-instructions",
            ], "initdb")
        hba = [
            "# written by juicecache's `stack up` (rewritten on every start)",
            f"local all {self.superuser} peer",
            f"host {self.cfg.postgres_db} {self.cfg.postgres_user} 0.0.0.0/0 scram-sha-256",
            f"host {PREFECT_DB} {PREFECT_DB} 0.0.0.0/0 scram-sha-256",
        ]
        (pgdata / "pg_hba.conf").write_text("\n".join(hba) + "\n")
        if self.owner is not None:
            os.chown(pgdata / "pg_hba.conf", *self.owner)

    def spawn(self) -> None:
        pgdata = self.cfg.postgres_dir
        _spawn(self.cfg, "postgres", [
            str(self.bindir / "postgres"), "-D", str(pgdata), "-p", str(self.cfg.postgres_port),
            "-c", f"listen_addresses={self.cfg.host}", "-c", f"unix_socket_directories={pgdata}",
            # JuiceFS clients pool connections (a few per mount), the Prefect server up to 15
            "-c", "max_connections=300", "-c", "ssl=off",
        ], env=self.env, **self.popen)

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run SQL as the superuser, from stdin (it may hold password verifiers)."""
        return self._run([
            str(self.bindir / "psql"), "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-h", str(self.cfg.postgres_dir),
            "-p", str(self.cfg.postgres_port), "-U", self.superuser, "-d", database, "-f", "-",
        ], "setup", stdin=sql)

    def create_databases(self) -> None:
        """JuiceFS's role and database, the Prefect server's; passwords set (again) every time."""
        statements = []
        for role, database in ((self.cfg.postgres_user, self.cfg.postgres_db), (PREFECT_DB, PREFECT_DB)):
            password, _ = postgres_password(self.cfg, role)
            statements += [
                f"SELECT format('CREATE ROLE %I LOGIN', {_sql_literal(role)}) "
                f"WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = {_sql_literal(role)})\\gexec",
                f'ALTER ROLE "{role}" LOGIN PASSWORD {_sql_literal(scram_verifier(password))};',
                f"SELECT format('CREATE DATABASE %I OWNER %I', {_sql_literal(database)}, {_sql_literal(role)}) "
                f"WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = {_sql_literal(database)})\\gexec",
            ]
        self.psql("\n".join(statements) + "\n")
        # Prefect's migrations create pg_trgm; a trusted extension, but created here once as superuser.
        self.psql("CREATE EXTENSION IF NOT EXISTS pg_trgm;\n", database=PREFECT_DB)


def postgres_sql(cfg: StackConfig, sql: str, database: str = "postgres") -> str:
    """Run SQL on the stack's PostgreSQL as its superuser (unix socket, peer authentication);
    for the benchmark and tests (e.g. a schema for a second JuiceFS volume: `&search_path=`)."""
    return _PgRunner(cfg).psql(sql, database)
