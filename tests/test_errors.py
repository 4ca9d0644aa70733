"""Bad input and broken environments: one line on stderr, a non-zero exit, never a traceback."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from juicecache.volume import MountState, mount_info
from tests.support.environment import Sandbox, juicefs_client_pids
from tests.support.processes import free_port
from tests.support.runs import assert_one_line_error


@pytest.mark.parametrize(
    "args, fragment",
    [
        (("-input",), "expected at least one argument"),
        ((), "-input"),
        (("-input", "1", "--bogus"), "unrecognized arguments: --bogus"),
        (("-input", "1", "--expire", "soon"), "invalid duration"),
        (("mount", "--bogus"), "unrecognized arguments"),
    ],
)
def test_bad_command_lines(sandbox: Sandbox, args: tuple[str, ...], fragment: str) -> None:
    done = sandbox.run(*args)
    assert done.returncode == 2
    assert_one_line_error(done, fragment)


def test_unreadable_env_file(sandbox: Sandbox) -> None:
    broken = sandbox.path / "broken.env"
    broken.write_bytes(b"JFS_NAME=\xff\xfe\n")
    assert_one_line_error(sandbox.run("-input", "1", extra_env={"JUICECACHE_ENV_FILE": str(broken)}), "cannot read", "broken.env")
    folder = sandbox.path / "folder.env"
    folder.mkdir()
    assert_one_line_error(sandbox.run("-input", "1", extra_env={"JUICECACHE_ENV_FILE": str(folder)}), "cannot read")


def test_bad_setting_is_named(sandbox: Sandbox) -> None:
    assert_one_line_error(sandbox.run("-input", "1", extra_env={"JFS_NAME": "Bad Name!"}), "JFS_NAME")
    assert_one_line_error(sandbox.run("-input", "1", extra_env={"JUICECACHE_LOCK_TIMEOUT": "-3"}), "JUICECACHE_LOCK_TIMEOUT")
    assert_one_line_error(sandbox.run("-input", "1", extra_env={"JUICECACHE_DEMO_SECONDS": "soon"}), "JUICECACHE_DEMO_SECONDS")


def test_env_file_is_loaded_and_environment_wins(sandbox: Sandbox) -> None:
    env_file = sandbox.path / "custom.env"
    env_file.write_text(f"JUICECACHE_FALLBACK_DIR={sandbox.path / 'from-dotenv'}\n")
    sandbox.env["JUICECACHE_ENV_FILE"] = str(env_file)

    environment_wins = sandbox.run("-input", "1", "--json")
    assert environment_wins.returncode == 0, environment_wins.stderr
    assert json.loads(environment_wins.stdout)["storage"].startswith(str(sandbox.fallback_dir))

    del sandbox.env["JUICECACHE_FALLBACK_DIR"]
    from_dotenv = sandbox.run("-input", "1", "--json")
    assert from_dotenv.returncode == 0, from_dotenv.stderr
    assert json.loads(from_dotenv.stdout)["storage"].startswith(str(sandbox.path / "from-dotenv"))


def test_unreachable_prefect_server_is_one_line(sandbox: Sandbox) -> None:
    url = f"http://127.0.0.1:{free_port()}/api"
    assert_one_line_error(sandbox.run("-input", "1", extra_env={"PREFECT_API_URL": url}), "PREFECT_API_URL", url)


def test_dead_mount_fails_fast_and_writes_nothing_locally(mounted: Sandbox) -> None:
    pids = juicefs_client_pids(mounted.cache_dir)
    assert pids, "the JuiceFS client process was not found"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    assert mount_info(mounted.mount_point).state is MountState.DEAD
    started = time.monotonic()
    done = mounted.run("-input", "1", timeout=60)
    # Fast means no retrying and no waiting on the mount: it fails as soon as its first probe
    # answers. The whole process took 4 s here, and once 11 s on a loaded machine.
    assert time.monotonic() - started < 20
    assert_one_line_error(done, "dead", "stop_juice.sh", "start_juice.sh")
    assert not mounted.fallback_dir.exists()
