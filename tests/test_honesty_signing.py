"""Signing keys rotated and removed: an entry signed with another key, or read without the key
it was signed with, is refused before anything is unpickled, recomputed, and re-signed."""

from __future__ import annotations

import json

from juicecache.entryfile import read_header
from tests.support.environment import Sandbox

OLD = {"JUICECACHE_SIGNING_KEY": "old-signing-key-0123456789"}
NEW = {"JUICECACHE_SIGNING_KEY": "new-signing-key-9876543210"}
NONE = {"JUICECACHE_SIGNING_KEY": ""}


def run(box: Sandbox, keys: dict[str, str]) -> tuple[list[str], list[str]]:
    done = box.run("-input", "1", "2", "--per-item", "--json", extra_env=keys)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    report = json.loads(done.stdout)
    assert report["result"] == {"count": 2, "sum": 3, "text": ""}
    return [item["cache"] for item in report["items"]], [line for line in done.stderr.splitlines() if line.startswith("warning:")]


def signed_by(box: Sandbox) -> set[tuple[str, str | None]]:
    root = box.mount_point / "prefect-cache"
    return {(read_header(path).algorithm, read_header(path).key_id) for kind in ("records", "data") for path in (root / kind).glob("*")}


def test_rotated_and_removed_signing_keys(mounted: Sandbox) -> None:
    assert run(mounted, OLD) == (["miss", "miss"], [])
    old_id = signed_by(mounted)
    assert len(old_id) == 1 and next(iter(old_id))[0] == "blake3-keyed"

    # Rotated: entries signed with the old key are refused (one warning each), then re-signed.
    caches, lines = run(mounted, NEW)
    assert caches == ["miss", "miss"] and len(lines) == 2, lines
    assert all("refused (signed with another key" in line for line in lines), lines
    new_id = signed_by(mounted)
    assert len(new_id) == 1 and new_id != old_id
    assert run(mounted, NEW) == (["hit", "hit"], [])

    # Removed: signed entries are refused where no key is set (never read as mere checksums) ...
    caches, lines = run(mounted, NONE)
    assert caches == ["miss", "miss"] and len(lines) == 2, lines
    assert all("refused (signed, but JUICECACHE_SIGNING_KEY is not set here" in line for line in lines), lines
    assert signed_by(mounted) == {("blake3", None)}
    assert run(mounted, NONE) == (["hit", "hit"], [])

    # ... and the unsigned entries written meanwhile are refused once a key is set again.
    caches, lines = run(mounted, NEW)
    assert caches == ["miss", "miss"] and len(lines) == 2 and all("refused (not signed" in line for line in lines), lines
    assert signed_by(mounted) == new_id
