"""Entries that cannot be trusted are misses: killed writers, damaged files, forged and tampered entries.

Every case runs on a real mounted volume and ends with the right value recomputed,
one warning per refused entry, and never a traceback.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from juicecache.entryfile import EntryHeader, EntryRefused, read_header, write_atomically
from tests.support.big_result import payload
from tests.support.environment import REPO, Sandbox
from tests.support.processes import wait_until
from tests.support.runs import cache_folder

BIG_RESULT = REPO / "tests" / "support" / "big_result.py"
SIGNING = {"JUICECACHE_SIGNING_KEY": "test-signing-key-0123456789"}


def warnings(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("warning:")]


def entries_in(folder: Path) -> list[str]:
    """What a reader can see: every file but temporaries."""
    return [name for name in os.listdir(folder) if not name.startswith(".tmp-")] if folder.exists() else []


def run_items(box: Sandbox, *values: str, extra_env: dict[str, str] | None = None) -> tuple[dict, str]:
    done = box.run("-input", *values, "--per-item", "--json", extra_env=extra_env)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    return json.loads(done.stdout), done.stderr


def test_writer_killed_during_a_large_write_leaves_no_entry(mounted: Sandbox) -> None:
    megabytes = 200
    expected = hashlib.sha256(payload(megabytes)).hexdigest()
    env = {**mounted.env, "PYTHONPATH": str(REPO)}
    data = cache_folder(mounted) / "data"

    def writing_temporary() -> bool:
        return data.exists() and any(
            item.name.startswith(".tmp-") and item.stat().st_size > 8 << 20 for item in os.scandir(data)
        )

    writer = subprocess.Popen([sys.executable, str(BIG_RESULT), str(megabytes)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert wait_until(writing_temporary, timeout=120, interval=0.02), "the large write never started"
    finally:
        writer.kill()  # SIGKILL, mid-write
        writer.communicate()
    assert writer.returncode == -signal.SIGKILL
    assert not entries_in(data) and not entries_in(data.parent / "records"), "a partial entry became visible"
    assert any(name.startswith(".tmp-") for name in os.listdir(data))

    again = subprocess.run([sys.executable, str(BIG_RESULT), str(megabytes)], env=env, capture_output=True, text=True, timeout=180)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout) == {"cache": "Completed", "sha256": expected, "bytes": megabytes << 20}
    assert not warnings(again.stderr) and "Traceback" not in again.stderr

    hit = subprocess.run([sys.executable, str(BIG_RESULT), str(megabytes)], env=env, capture_output=True, text=True, timeout=180)
    assert hit.returncode == 0, hit.stderr
    assert json.loads(hit.stdout) == {"cache": "Cached", "sha256": expected, "bytes": megabytes << 20}

    # The dead writer's temporary is never listed as an entry; gc removes it once an hour old.
    assert json.loads(mounted.run("cache", "ls", "--json").stdout)["total"] == 1
    assert any(name.startswith(".tmp-") for name in os.listdir(data))


def test_damaged_entries_are_recomputed_with_one_warning_each(mounted: Sandbox) -> None:
    first, _ = run_items(mounted, "1", "2", "3", "4", "5", "6")
    keys = [item["key"] for item in first["items"]]
    root = cache_folder(mounted)
    damage = {
        keys[0]: ("records", lambda raw: raw[: len(raw) // 2]),  # truncated
        keys[1]: ("records", lambda raw: b""),  # empty
        keys[2]: ("records", lambda raw: b"\x00garbage\xff" * 40),  # garbage
        # Small results travel inside their record (`EntryHeader.inline`): their payload is damaged there.
        keys[3]: ("records", lambda raw: raw[:-1] + bytes([raw[-1] ^ 1])),
        keys[4]: ("records", lambda raw: raw[:-16] + os.urandom(16)),
        keys[5]: ("records", lambda raw: re.sub(rb'"inline":(\d+)', lambda m: b'"inline":%d' % (int(m[1]) + 1), raw, count=1)),
    }
    for key, (folder, spoil) in damage.items():
        path = root / folder / key
        path.write_bytes(spoil(path.read_bytes()))

    second, stderr = run_items(mounted, "1", "2", "3", "4", "5", "6")
    assert [item["cache"] for item in second["items"]] == ["miss"] * 6
    assert second["result"] == first["result"] == {"count": 6, "sum": 21, "text": ""}
    lines = warnings(stderr)
    assert len(lines) == 6, stderr
    for key, (folder, _) in damage.items():
        assert sum(f"{folder}/{key} refused" in line for line in lines) == 1, lines

    third, stderr = run_items(mounted, "1", "2", "3", "4", "5", "6")
    assert [item["cache"] for item in third["items"]] == ["hit"] * 6 and not warnings(stderr)
    assert third["result"] == first["result"]


def test_one_run_with_a_damaged_entry_prints_one_warning(mounted: Sandbox) -> None:
    first = mounted.run("-input", "5", "abc", "--json")
    assert first.returncode == 0, first.stderr
    key = json.loads(first.stdout)["key"]
    (cache_folder(mounted) / "records" / key).write_bytes(b"not a cache entry at all\n")

    done = mounted.run("-input", "5", "abc")
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("warning:") and key in lines[0], done.stderr
    assert "cache miss" in done.stdout and '{"count": 2, "sum": 5, "text": "abc"}' in done.stdout
    assert "1 damaged or unsigned entry refused" in done.stdout


class _CreatesMarker:
    """Unpickling this runs `open(marker, "w")`: what a malicious entry would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def raw_payload(marker: Path) -> bytes:
    """A payload in the form juicecache's own serializer reads ("juicecache-pickle": a raw pickle)."""
    return pickle.dumps(_CreatesMarker(marker))


def base64_payload(marker: Path) -> bytes:
    """A payload in the form Prefect's "pickle" serializer reads (base64 of a pickle)."""
    return base64.encodebytes(pickle.dumps(_CreatesMarker(marker)))


def test_crafted_payloads_are_really_dangerous(tmp_path: Path) -> None:
    """Guards the next test: each crafted payload creates its marker when loaded by the very
    serializer its record names, so only the checks before loading can keep it out."""
    from prefect.serializers import PickleSerializer

    from juicecache.serializer import RawPickleSerializer

    for name, serializer, make in (
        ("raw", RawPickleSerializer(), raw_payload), ("base64", PickleSerializer(), base64_payload),
    ):
        marker = tmp_path / name
        serializer.loads(make(marker)).close()
        assert marker.exists(), name


def _signed_record(record: Path) -> tuple[EntryHeader, bytes]:
    """A small result's record, as juicecache wrote it: its signed header and Prefect's metadata
    (the payload it carries, `EntryHeader.inline`, left out)."""
    line, content = record.read_bytes().split(b"\n", 1)
    genuine = EntryHeader.from_line(line + b"\n")
    assert genuine.inline is not None and genuine.algorithm == "blake3-keyed"
    return genuine, genuine.split(content)[0]


def test_tampered_signed_entries_are_refused_and_never_unpickled(mounted: Sandbox) -> None:
    first, _ = run_items(mounted, "1", "2", "3", extra_env=SIGNING)
    unsigned, forged, edited = (item["key"] for item in first["items"])
    root = cache_folder(mounted)
    markers = {case: mounted.path / f"unpickled-{case}" for case in ("unsigned", "forged", "edited")}
    for key in (unsigned, forged):  # cases 1 and 2 keep the metadata, which names juicecache's raw pickles
        assert json.loads(_signed_record(root / "records" / key)[1])["serializer"]["type"] == "juicecache-pickle"

    # 1. A raw pickle with a correct checksum but no signature (what anyone can write).
    evil = raw_payload(markers["unsigned"])
    content = _signed_record(root / "records" / unsigned)[1] + evil
    digest = hashlib.sha256(f"records/{unsigned}\ninline {len(evil)}\n".encode() + content).hexdigest()
    header = EntryHeader(len(content), digest, "sha256", None, "attacker", time.time(), "compute", inline=len(evil))
    (root / "records" / unsigned).write_bytes(header.to_line() + content)

    # 2. A raw pickle under a copy of a genuine signed header (key id included).
    evil = raw_payload(markers["forged"])
    genuine, metadata = _signed_record(root / "records" / forged)
    content = metadata + evil
    copied = dataclasses.replace(genuine, size=len(content), inline=len(evil))
    (root / "records" / forged).write_bytes(copied.to_line() + content)

    # 3. The record's serializer field edited, its signed header kept, and the payload replaced.
    evil = base64_payload(markers["edited"])
    record = root / "records" / edited
    genuine, metadata = _signed_record(record)
    edited_metadata = {**json.loads(metadata), "serializer": {"type": "pickle"}}  # Prefect's base64 pickle, which would load `evil`
    content = json.dumps(edited_metadata, separators=(",", ":")).encode() + evil
    copied = dataclasses.replace(genuine, size=len(content), inline=len(evil))
    record.write_bytes(copied.to_line() + content)

    # The markers are checked first, whatever the run did: an entry unpickled is the failure here.
    done = mounted.run("-input", "1", "2", "3", "--per-item", "--json", extra_env=SIGNING)
    unpickled = [case for case, marker in markers.items() if marker.exists()]
    assert not unpickled, f"tampered entries were unpickled: {unpickled}"
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    second, stderr = json.loads(done.stdout), done.stderr
    assert [item["cache"] for item in second["items"]] == ["miss"] * 3
    assert second["result"] == {"count": 3, "sum": 6, "text": ""}
    lines = warnings(stderr)
    assert len(lines) == 3, stderr
    assert any(f"records/{unsigned} refused (not signed" in line for line in lines), lines
    assert any(f"records/{forged} refused (signature mismatch" in line for line in lines), lines
    assert any(f"records/{edited} refused (signature mismatch" in line for line in lines), lines
    for key in (unsigned, forged, edited):
        assert read_header(root / "records" / key).algorithm == "blake3-keyed"


def print_nothing() -> None:
    """The body of the task whose run stores the entries below (never run)."""


@pytest.mark.parametrize("replaced", ["data", "records"], ids=["its payload file", "its record, carrying the payload"])
def test_an_entry_replaced_since_this_process_read_it_is_read_again(mounted: Sandbox, replaced: str) -> None:
    """A process remembers the entry files it checked (Prefect reads a hit's record twice, then its
    payload). An entry another run replaced since, on this host or another, is read anew."""
    from prefect import task
    from prefect.cache_policies import CacheKeyFnPolicy
    from prefect.context import TaskRunContext

    from juicecache.entryfile import DATA, INLINE_MAX_BYTES, RECORDS, Signer
    from juicecache.storage import EntryStorage, StoreConfig

    config = StoreConfig(cache_folder(mounted), Signer())
    records, data = (EntryStorage.create(kind, lambda: config) for kind in (RECORDS, DATA))

    size = INLINE_MAX_BYTES + 1 if replaced == DATA else 100  # a payload file, or one inside the record

    # A task whose cache policy keeps its keys in these records, as `cached_task`'s does.
    keyed_here = task(cache_policy=CacheKeyFnPolicy(cache_key_fn=lambda *_: "key").configure(key_storage=records))(print_nothing)

    def store(text: str) -> None:  # as Prefect writes a task run's entry, inside the run: payload, then record
        with TaskRunContext.model_construct(task=keyed_here):
            data.write_path("key", text.ljust(size).encode())
            records.write_path("key", json.dumps({"storage_key": "key", "value": text}).encode())

    def read() -> tuple[str, str]:
        return json.loads(records.read_path("key"))["value"], data.read_path("key").decode().rstrip()

    store("first")
    assert (cache_folder(mounted) / DATA / "key").exists() == (replaced == DATA)
    assert read() == ("first", "first")
    assert read() == ("first", "first")  # the record served from memory, the payload read again
    write_atomically(cache_folder(mounted) / replaced / "key", [b"not even an entry"])  # another writer's rename
    with pytest.raises(EntryRefused):  # a record is served only with a payload that checks out
        records.read_path("key")
    store("second")
    assert read() == ("second", "second")
