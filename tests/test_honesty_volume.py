"""Volume and settings edge cases, on real mounts: another volume at the mount point, a mount
that is not juicecache's, a dead mount seen through the public API, mount options that
override juicecache's defaults, where JuiceFS's metadata backup goes, and settings files and
values at their edges."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from juicecache.settings import SettingsError, load_settings
from tests.support.environment import JUICECACHE_PREFIXES, MAIN, Sandbox, is_mounted, juicefs_client_pids
from tests.support.exec_log import ExecLog
from tests.support.processes import wait_until
from tests.support.runs import assert_one_line_error, volume_status


def test_another_volume_at_the_mount_point(mounted: Sandbox) -> None:
    """JFS_NAME not the mounted volume's: a run stops in one line instead of caching in a volume
    that is not the configured one (or silently in the fallback), and `mount` will not stack
    another volume on it."""
    other = {"JFS_NAME": "othervol", "JFS_META_URL": f"sqlite3://{mounted.path}/other.db", "JFS_BUCKET": f"{mounted.path}/other/"}
    done = mounted.run("-input", "1", extra_env=other)
    assert done.returncode == 1
    assert_one_line_error(done, "holds JuiceFS volume 'testvol', but JFS_NAME is 'othervol'")
    assert not mounted.fallback_dir.exists() and not (mounted.mount_point / "prefect-cache" / "records").exists()
    done = mounted.run("mount", extra_env=other)
    assert done.returncode == 1
    assert_one_line_error(done, "is in use by JuiceFS volume 'testvol'", "JFS_MOUNT_POINT")
    assert not Path(f"{mounted.path}/other.db").exists()  # refused before formatting anything
    assert json.loads(mounted.run("status", "--json").stdout)["volume"]["name"] == "testvol"


def test_a_mount_that_is_not_juicefs_is_never_unmounted_or_used(sandbox: Sandbox) -> None:
    sandbox.mount_point.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(sandbox.mount_point)], check=True)
    try:
        done = sandbox.run("unmount")
        assert done.returncode == 1
        assert_one_line_error(done, "holds a tmpfs mount, not JuiceFS: not touching it")
        assert is_mounted(sandbox.mount_point)
        done = sandbox.run("mount")
        assert done.returncode == 1
        assert_one_line_error(done, "is in use by a tmpfs mount", "JFS_MOUNT_POINT")
        status = volume_status(sandbox)  # a run would fall back, with a warning that says why
        assert status["mounted"] is False and "holds a tmpfs mount, not JuiceFS" in status["warning"]
        assert not os.listdir(sandbox.mount_point)
    finally:
        subprocess.run(["umount", "-l", str(sandbox.mount_point)], check=False)


def test_volume_status_on_a_dead_mount(mounted: Sandbox) -> None:
    for pid in juicefs_client_pids(mounted.cache_dir):
        os.kill(pid, 9)
    status = volume_status(mounted)
    assert status["mounted"] is False and status["results"] == "None"
    assert "dead" in status["warning"] and "start_juice.sh" in status["warning"]
    assert not mounted.fallback_dir.exists()  # never a silent split of the cache


def test_mount_options_override_juicecaches_defaults(sandbox: Sandbox) -> None:
    """A flag set in JFS_MOUNT_OPTIONS replaces juicecache's default for it; the other defaults
    stay. Read from the `juicefs mount` command line as started (see tests/support/exec_log.py)."""
    execs = ExecLog(sandbox.path / "shims")
    env = execs.env({**sandbox.env, "JFS_MOUNT_OPTIONS": "--io-retries 5 --get-timeout=20s"})
    done = subprocess.run([execs.python, str(MAIN), "mount"], env=env, capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr
    mount = [line.split() for line in execs.lines() if " mount " in line]
    assert len(mount) == 1, execs.lines()
    argv = mount[0]
    flags = [part.split("=", 1)[0] for part in argv if part.startswith("--")]
    assert flags.count("--io-retries") == 1 and argv[argv.index("--io-retries") + 1] == "5"
    assert flags.count("--get-timeout") == 1 and "--get-timeout=20s" in argv
    assert argv[argv.index("--put-timeout") + 1] == "10s" and argv[argv.index("--entry-cache") + 1] == "0"


def test_the_metadata_backup_stays_in_the_cache_folder(sandbox: Sandbox) -> None:
    """JuiceFS dumps its periodic metadata backup into `$TMPDIR/meta/` before uploading it, and
    leaves that folder behind: a mount's goes into its cache folder, not the machine's /tmp.
    The backup comes every few seconds here: JuiceFS refuses an interval under 5 minutes
    unless SKIP_BACKUP_META_CHECK is set."""
    done = sandbox.run("mount", timeout=90, extra_env={"JFS_MOUNT_OPTIONS": "--backup-meta 10s", "SKIP_BACKUP_META_CHECK": "true"})
    assert done.returncode == 0, done.stderr
    assert wait_until(lambda: any((sandbox.path / "objects").rglob("meta/dump-*.json.gz")), 90), "no metadata backup was uploaded"
    assert (sandbox.cache_dir / "tmp" / "meta").is_dir()  # volume.backup_scratch


@pytest.fixture
def environment() -> Iterator[None]:
    """load_settings copies .env into the process environment: put it back as it was."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def settings_with(monkeypatch, tmp_path: Path, env_file: str | None, **values: str):
    for name in [name for name in os.environ if name.startswith(JUICECACHE_PREFIXES)]:
        monkeypatch.delenv(name)
    if env_file is not None:
        (tmp_path / ".env").write_text(env_file)
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    return load_settings(tmp_path)


def test_settings_at_their_edges(monkeypatch, tmp_path: Path, environment: None) -> None:
    """In-process: load_settings itself, with the process environment restored afterwards."""
    # The environment wins over .env, even set empty: an empty value means the default.
    assert settings_with(monkeypatch, tmp_path, "JFS_NAME=fromfile\n").volume_name == "fromfile"
    assert settings_with(monkeypatch, tmp_path, "JFS_NAME=fromfile\n", JFS_NAME="").volume_name == "juicecache"
    assert settings_with(monkeypatch, tmp_path, "JFS_NAME=fromfile\n", JFS_NAME="fromenv").volume_name == "fromenv"
    # A .env that is missing is fine; a JUICECACHE_ENV_FILE that is missing is an error.
    assert settings_with(monkeypatch, tmp_path / "nowhere", None).volume_name == "juicecache"
    try:
        settings_with(monkeypatch, tmp_path, None, JUICECACHE_ENV_FILE=str(tmp_path / "missing.env"))
        raise AssertionError("a missing JUICECACHE_ENV_FILE was accepted")
    except SettingsError as exc:
        assert "JUICECACHE_ENV_FILE" in str(exc) and "missing.env" in str(exc)
    for bad in ("/abs/olute", "../outside", "a/../../b", "."):
        try:
            settings_with(monkeypatch, tmp_path, None, JUICECACHE_RESULTS_DIR=bad)
            raise AssertionError(f"JUICECACHE_RESULTS_DIR={bad!r} was accepted")
        except SettingsError as exc:
            assert "JUICECACHE_RESULTS_DIR" in str(exc), exc
    assert settings_with(monkeypatch, tmp_path, None, JUICECACHE_RESULTS_DIR="team/cache").results_dir == "team/cache"


def test_bad_settings_fail_main_py_in_one_line(sandbox: Sandbox) -> None:
    for extra, fragment in (
        ({"JUICECACHE_ENV_FILE": str(sandbox.path / "missing.env")}, "JUICECACHE_ENV_FILE"),
        ({"JUICECACHE_RESULTS_DIR": "../elsewhere"}, "JUICECACHE_RESULTS_DIR"),
    ):
        done = sandbox.run("-input", "1", extra_env=extra)
        assert done.returncode == 1
        assert_one_line_error(done, fragment)
