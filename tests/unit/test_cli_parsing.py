"""The command line's parsing and one-line failure explanations, without a volume or a server."""

from __future__ import annotations

import argparse
import errno
from pathlib import Path

import pytest

from juicecache.cli import run
from juicecache.cli.common import UsageError, duration, invocation, parse_size, positive_int, prog
from juicecache.cli.run import describe_failure, parse_value
from juicecache.settings import Settings, load_settings
from juicecache.volume import mount_log


@pytest.mark.parametrize(
    "text, size",
    [
        ("4096", 4096),
        ("0", 0),
        ("10GB", 10_000_000_000),
        ("10gb", 10_000_000_000),
        ("500M", 500_000_000),
        ("1kb", 1000),
        ("1KiB", 1024),
        ("1.5GiB", int(1.5 * 1024**3)),
        (" 2 TB ", 2_000_000_000_000),
        ("1P", 10**15),
        ("12B", 12),
    ],
)
def test_sizes(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "GB", "10XB", "-1GB", "1e3", "ten"])
def test_bad_sizes(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="invalid size"):
        parse_size(text)


@pytest.mark.parametrize("text", ["30s", "10m", "1h", "7d", "2w", "90", "1.5h"])
def test_durations_are_checked_and_kept_as_text(text: str) -> None:
    assert duration(text) == text


@pytest.mark.parametrize("text", ["soon", "", "0s", "-1h", "1y"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="invalid duration"):
        duration(text)


def test_positive_whole_numbers() -> None:
    assert positive_int("3") == 3
    for text in ("0", "-1", "x", "1.5", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="not a positive whole number"):
            positive_int(text)


@pytest.mark.parametrize(
    "text, value",
    [
        ("1", 1),
        ("-7", -7),
        ("+3", 3),
        ("2.5", 2.5),
        (".5", 0.5),
        ("1e3", 1000.0),
        ("-2E-2", -0.02),
        ("abc", "abc"),
        ("nan", "nan"),
        ("inf", "inf"),
        ("1e999", "1e999"),
        ("1_000", "1_000"),
        ("0x10", "0x10"),
        ("", ""),
    ],
)
def test_values(text: str, value: int | float | str) -> None:
    parsed = parse_value(text)
    assert parsed == value and type(parsed) is type(value)


def test_the_demo_parser_fails_with_a_usage_error() -> None:
    parser, _ = run.command()
    assert parser.parse_args(["-input", "1", "2.5", "--expire", "1h"]).inputs == ["1", "2.5"]
    for argv in (["-input"], [], ["-input", "1", "--bogus"], ["-input", "1", "--expire", "soon"]):
        with pytest.raises(UsageError):
            parser.parse_args(argv)


@pytest.mark.parametrize(
    "argv0, name, hint",
    [
        ("/opt/venv/bin/juicecache", "juicecache", "juicecache ui"),
        ("/home/user/project/main.py", "main.py", "python main.py ui"),
        ("-c", "main.py", "python main.py ui"),
    ],
)
def test_the_program_is_named_as_it_was_started(monkeypatch: pytest.MonkeyPatch, argv0: str, name: str, hint: str) -> None:
    monkeypatch.setattr("sys.argv", [argv0])
    assert prog() == name
    assert invocation("ui") == hint


# --- failure explanations ------------------------------------------------------------


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    for name in ("JUICECACHE_ROOT", "JUICECACHE_ENV_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("JFS_MOUNT_POINT", str(tmp_path / "mnt"))
    monkeypatch.setenv("JFS_CACHE_DIR", str(tmp_path / "juicefs-cache"))
    return load_settings(tmp_path)


@pytest.mark.parametrize("code", [errno.ENOTCONN, errno.ECONNABORTED])
def test_a_dead_mount_says_how_to_recover(settings: Settings, code: int) -> None:
    for on_volume in (True, False):
        line = describe_failure(OSError(code, "Transport endpoint is not connected", "/x"), settings, on_volume=on_volume)
        assert str(settings.mount_point) in line and "dead" in line
        assert "./stop_juice.sh then ./start_juice.sh" in line


def test_an_io_error_on_the_volume_names_the_engines_and_the_log(settings: Settings) -> None:
    line = describe_failure(OSError(errno.EIO, "Input/output error", "/mnt/records/k"), settings, on_volume=True)
    assert line.startswith(f"the JuiceFS volume at {settings.mount_point} failed (Input/output error: /mnt/records/k)")
    assert "JFS_META_URL" in line and "JFS_BUCKET" in line and str(mount_log(settings)) in line
    bare = describe_failure(OSError(errno.EIO, "Input/output error"), settings, on_volume=True)
    assert "failed (Input/output error):" in bare


def test_an_io_error_in_a_local_folder_is_just_the_error(settings: Settings) -> None:
    assert describe_failure(OSError(errno.EIO, "Input/output error", "/tmp/f"), settings, on_volume=False) == "Input/output error: /tmp/f"


def test_other_os_errors(settings: Settings) -> None:
    assert describe_failure(OSError(errno.ENOSPC, "No space left on device", "/v/data/k"), settings, True) == "No space left on device: /v/data/k"
    assert describe_failure(PermissionError(errno.EACCES, "Permission denied"), settings, True) == "Permission denied"
    assert describe_failure(OSError("no errno, just words"), settings, True) == "no errno, just words"


def test_other_exceptions_give_their_first_line(settings: Settings) -> None:
    assert describe_failure(ValueError("  first line\nsecond line\nthird"), settings, True) == "first line"
    assert describe_failure(ValueError(" \n "), settings, True) == "ValueError"
    assert describe_failure(RuntimeError(), settings, False) == "RuntimeError"
