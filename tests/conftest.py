"""Shared fixtures: one real Prefect server for the session, real JuiceFS volumes per test.

Every subprocess run of `main.py` gets an isolated environment: its own empty `.env`,
its own volume, fallback folder and Prefect home, and `PREFECT_API_URL` pointed at the
session's server (a temporary server per process would cost 5-15 s each).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from juicecache.volume import juicefs_binary

# Tests that import Prefect in pytest's own process keep its files in a temporary folder,
# never in ~/.prefect (every run the tests start gets its own PREFECT_HOME).
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="juicecache-tests-prefect-"))

REPO = Path(__file__).resolve().parent.parent
MAIN = REPO / "main.py"

# The fault suite's summary table, printed at the end of any run that includes it.
pytest_plugins = ["tests.support.fault_report"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate, timeout: float, interval: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def api_answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


def stop_group(process: subprocess.Popen) -> None:
    """SIGTERM a server started with start_new_session=True, and its children; SIGKILL after 20 s."""
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `prefect server start` on a free loopback port, shared by the whole session."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_API_URL": "",
        # Where its UI looks for the API (Prefect ignores --host/--port for that).
        "PREFECT_SERVER_API_HOST": "127.0.0.1",
        "PREFECT_SERVER_API_PORT": str(port),
    }
    log = open(home / "server.log", "wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        if not wait_until(lambda: api_answers(url) or server.poll() is not None, timeout=120) or server.poll() is not None:
            pytest.fail(f"Prefect server did not start: {(home / 'server.log').read_text()[-2000:]}")
        yield url
    finally:
        stop_group(server)
        log.close()


@dataclass
class Sandbox:
    """An isolated juicecache configuration for subprocess runs; `env` overrides `.env` entirely."""

    path: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def mount_point(self) -> Path:
        return Path(self.env["JFS_MOUNT_POINT"])

    @property
    def cache_dir(self) -> Path:
        return Path(self.env["JFS_CACHE_DIR"])

    @property
    def fallback_dir(self) -> Path:
        return Path(self.env["JUICECACHE_FALLBACK_DIR"])

    def run(self, *args: str, timeout: float = 120, extra_env: dict[str, str] | None = None, script: Path = MAIN) -> subprocess.CompletedProcess[str]:
        command = [str(script), *args] if script.suffix == ".sh" else [sys.executable, str(script), *args]
        return subprocess.run(
            command, env={**self.env, **(extra_env or {})}, capture_output=True, text=True,
            timeout=timeout, stdin=subprocess.DEVNULL,
        )

    def timed(self, *args: str, **kwargs) -> tuple[subprocess.CompletedProcess[str], float]:
        started = time.monotonic()
        done = self.run(*args, **kwargs)
        return done, time.monotonic() - started


def sandbox_env(path: Path, api_url: str) -> dict[str, str]:
    env_file = path / "empty.env"
    env_file.write_text("")
    inherited = {k: v for k, v in os.environ.items() if not k.startswith(("JFS_", "JUICECACHE_", "PREFECT_", "META_"))}
    return {
        **inherited,
        "JUICECACHE_ENV_FILE": str(env_file),
        "PYTHONPATH": str(REPO),  # scripts under test import this tree's juicecache
        "JFS_NAME": "testvol",
        "JFS_META_URL": f"sqlite3://{path}/meta.db",
        "JFS_STORAGE": "file",
        "JFS_BUCKET": f"{path}/objects/",
        "JFS_MOUNT_POINT": str(path / "mnt"),
        "JFS_CACHE_DIR": str(path / "cache"),
        "JUICECACHE_FALLBACK_DIR": str(path / "fallback"),
        # Runs always have a server (PREFECT_API_URL); a test that takes it away gets Prefect's
        # temporary one, never a background server that would outlive the test.
        "JUICECACHE_BACKGROUND_SERVER": "0",
        "PREFECT_HOME": str(path / "prefect"),
        "PREFECT_API_URL": api_url,
    }


def is_mounted(mount_point: Path) -> bool:
    with open("/proc/self/mountinfo") as table:
        return any(line.split()[4] == str(mount_point) for line in table)


def juicefs_client_pids(cache_dir: Path) -> list[int]:
    """The `juicefs mount` processes (supervisor and worker) using `cache_dir`.

    JuiceFS rewrites its own command line (to hide the metadata password), which blanks
    the tail of it; the cache dir comes early enough to survive.
    """
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            exe = os.readlink(proc / "exe")
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if exe.endswith("/juicefs") and b" mount " in cmdline and str(cache_dir).encode() in cmdline:
            pids.append(int(proc.name))
    return pids


def force_unmount(mount_point: Path) -> None:
    """Best effort, for teardown: whatever state the mount is in, detach it."""
    if is_mounted(mount_point):
        subprocess.run([juicefs_binary(), "umount", "--force", str(mount_point)], capture_output=True, timeout=60)
    if is_mounted(mount_point):
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True, timeout=30)


@pytest.fixture
def sandbox(tmp_path: Path, prefect_api: str) -> Iterator[Sandbox]:
    """Configuration for a fresh embedded volume (not mounted yet)."""
    box = Sandbox(tmp_path, sandbox_env(tmp_path, prefect_api))
    try:
        yield box
    finally:
        force_unmount(box.mount_point)
        shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.fixture
def mounted(sandbox: Sandbox) -> Sandbox:
    """A fresh embedded JuiceFS volume, formatted and mounted through `main.py mount`."""
    done = sandbox.run("mount", timeout=90)
    assert done.returncode == 0, done.stderr
    return sandbox
