"""An isolated juicecache environment for the processes a test starts, and the mount helpers its teardown needs.

A `Sandbox` is one configuration (its own volume settings, mount point, JuiceFS cache dir,
fallback folder and Prefect home) and runs `main.py` or a script with it. The environment
is built from scratch: no juicecache or Prefect setting of whoever runs the tests leaks in,
and an empty `.env` file stands in for this checkout's. The multi-host cluster's client
hosts are sandboxes too (`tests/support/cluster.py`'s `Machine`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from juicecache.volume import juicefs_binary

REPO = Path(__file__).resolve().parents[2]
MAIN = REPO / "main.py"

JUICECACHE_PREFIXES = ("JFS_", "JUICECACHE_", "META_")  # every juicecache setting (META_PASSWORD included)
SETTING_PREFIXES = (*JUICECACHE_PREFIXES, "PREFECT_")


def inherited_env(drop: tuple[str, ...] = SETTING_PREFIXES) -> dict[str, str]:
    """This process's environment without the variables named by `drop`: a developer's own
    juicecache or Prefect configuration must never reach what a test starts."""
    return {name: value for name, value in os.environ.items() if not name.startswith(drop)}


def isolated_env(folder: Path) -> dict[str, str]:
    """`inherited_env()`, an empty `.env` file in `folder` in place of this checkout's, and this
    checkout's juicecache first on the path (scripts beside the tests import it)."""
    env_file = folder / "empty.env"
    env_file.write_text("")
    return {**inherited_env(), "JUICECACHE_ENV_FILE": str(env_file), "PYTHONPATH": str(REPO)}


# The demo task's pretend computation in a sandbox's runs (3 s by default): most tests check
# whether a run was a hit or a miss, not how long a miss takes, and their misses add up to
# minutes. Tests that need the default's length (a hit measured against a miss, a run killed
# while it computes) set it back with `Sandbox.use_default_demo_seconds`.
DEMO_SECONDS = 1.0


def sandbox_env(path: Path, api_url: str) -> dict[str, str]:
    """An embedded volume (SQLite metadata, objects in a folder) under `path`, reporting to `api_url`."""
    return {
        **isolated_env(path),
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
        "JUICECACHE_DEMO_SECONDS": f"{DEMO_SECONDS:g}",
        "PREFECT_HOME": str(path / "prefect"),
        "PREFECT_API_URL": api_url,
    }


@dataclass
class Sandbox:
    """A juicecache configuration for subprocess runs; `env` is their whole environment (no `.env` is read).

    Every `run`'s output is kept in `transcript` and every command line in `commands`, so
    tests can check what was printed or what `ps` showed.
    """

    path: Path
    env: dict[str, str]
    umask: int | None = None  # the umask its commands start with (None: inherited)
    python: str = sys.executable  # a shim venv's (see exec_log) when its commands' children are logged
    transcript: list[str] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)

    @property
    def mount_point(self) -> Path:
        return Path(self.env["JFS_MOUNT_POINT"])

    @property
    def cache_dir(self) -> Path:
        return Path(self.env["JFS_CACHE_DIR"])

    @property
    def fallback_dir(self) -> Path:
        return Path(self.env["JUICECACHE_FALLBACK_DIR"])

    def use_default_demo_seconds(self) -> None:
        """Let the demo task take its default time (see DEMO_SECONDS)."""
        self.env.pop("JUICECACHE_DEMO_SECONDS", None)

    def argv(self, *args: str, script: Path = MAIN) -> list[str]:
        argv = [str(script), *args] if script.suffix == ".sh" else [self.python, str(script), *args]
        self.commands.append(" ".join(argv))
        return argv

    def run(self, *args: str, timeout: float = 120, extra_env: dict[str, str] | None = None, script: Path = MAIN) -> subprocess.CompletedProcess[str]:
        done = self._run(
            self.argv(*args, script=script), env={**self.env, **(extra_env or {})}, capture_output=True, text=True,
            timeout=timeout, stdin=subprocess.DEVNULL, cwd=REPO, umask=self._umask(),
        )
        self.transcript.append(done.stdout + done.stderr)
        return done

    def popen(self, *args: str, script: Path = MAIN, extra_env: dict[str, str] | None = None, stdin=subprocess.DEVNULL) -> subprocess.Popen[str]:
        return self._popen(
            self.argv(*args, script=script), env={**self.env, **(extra_env or {})},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=stdin, cwd=REPO, umask=self._umask(),
        )

    def timed(self, *args: str, **kwargs) -> tuple[subprocess.CompletedProcess[str], float]:
        started = time.monotonic()
        done = self.run(*args, **kwargs)
        return done, time.monotonic() - started

    def demo(self, *values: str, extra_env: dict[str, str] | None = None) -> tuple[dict, float]:
        """The demo flow on `values`: its `--json` report, and how long the run took."""
        done, seconds = self.timed("-input", *values, "--json", extra_env=extra_env)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout), seconds

    def _umask(self) -> int:
        return -1 if self.umask is None else self.umask  # -1: subprocess leaves the umask alone

    # Where its commands start: here, on this machine's own network (a cluster host overrides both).
    def _run(self, argv: list[str], **kwargs) -> subprocess.CompletedProcess[str]:
        return subprocess.run(argv, **kwargs)

    def _popen(self, argv: list[str], **kwargs) -> subprocess.Popen[str]:
        return subprocess.Popen(argv, **kwargs)


@contextmanager
def local_sandbox(path: Path, api_url: str) -> Iterator[Sandbox]:
    """A sandbox for a fresh embedded volume under `path` (not mounted yet); afterwards, even
    after a failure, whatever got mounted is detached and `path` removed."""
    box = Sandbox(path, sandbox_env(path, api_url))
    try:
        yield box
    finally:
        force_unmount(box.mount_point)
        shutil.rmtree(path, ignore_errors=True)


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
