"""`cache ls/stats/rm/clear/gc` and `status` on a real mounted volume, with entries made by real runs."""

from __future__ import annotations

import dataclasses
import fcntl
import itertools
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from juicecache.entryfile import EntryHeader, Signer, read_header, write_atomically
from tests.support.environment import REPO, Sandbox, juicefs_client_pids
from tests.support.processes import free_port
from tests.support.runs import (
    ON_PATH,
    USER_FLOW,
    assert_one_line_error,
    cache_folder,
    listing_from_files,
    run_flow,
    run_json,
    without_expired,
)


def entry_files(box: Sandbox, key: str) -> list[Path]:
    root = cache_folder(box)
    return [path for path in (root / "records" / key, root / "data" / key) if path.exists()]


def whole_entry(box: Sandbox, key: str) -> bool:
    """Is `key`'s entry all there: its record, and its payload (carried inside it, or a file of its own)?"""
    record = cache_folder(box) / "records" / key
    return record.exists() and (read_header(record).inline is not None or (record.parent.parent / "data" / key).exists())


class HeldLock:
    """Holds a key's lock as a run computing or reading it would (flock on the volume)."""

    def __init__(self, box: Sandbox, key: str) -> None:
        self.path = cache_folder(box) / "locks" / f"{key}.lock"

    def __enter__(self) -> HeldLock:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)


def rewrite_expiration(record: Path, expiration: str | None) -> None:
    """Replace a record (new file, new inode) as a refreshing run would, with another expiration."""
    header, body = record.read_bytes().split(b"\n", 1)
    old = EntryHeader.from_line(header + b"\n")
    metadata, payload = old.split(body)  # a small result's payload travels inside its record: kept
    content = json.dumps({**json.loads(metadata), "expiration": expiration}, separators=(",", ":")).encode() + (payload or b"")
    digest = Signer().digest(f"records/{record.name}", content, inline=old.inline)
    new = dataclasses.replace(old, size=len(content), digest=digest)
    write_atomically(record, [new.to_line(), content])


def test_ls_stats_and_rm(mounted: Sandbox) -> None:
    items = run_json(mounted, "-input", "1", "2", "3", "--per-item")["items"]
    expiring = run_json(mounted, "-input", "4", "--expire", "2s")
    expiring_written = time.monotonic()
    keys = [item["key"] for item in items]

    listed = run_json(mounted, "cache", "ls")
    assert listed["total"] == 4 and listed["root"] == str(cache_folder(mounted))
    entries = listed["entries"]
    assert entries[0]["key"] == expiring["key"]  # newest first
    assert {entry["key"] for entry in entries} == {*keys, expiring["key"]}
    for entry in entries:
        assert entry["task"] == "compute" and entry["host"] == socket.gethostname()
        assert entry["size"] > 0 and entry["problem"] is None and entry["created"]
    assert entries[0]["expires"] and all(entry["expires"] is None for entry in entries[1:])
    assert [entry["created"] for entry in entries] == sorted((entry["created"] for entry in entries), reverse=True)

    # The listing index lets later scans skip unchanged records; a replaced record is read again.
    index = cache_folder(mounted) / "index" / "entries.json"
    assert index.is_file()
    rewrite_expiration(cache_folder(mounted) / "records" / keys[2], "2099-01-01T00:00:00Z")
    relisted = {entry["key"]: entry for entry in run_json(mounted, "cache", "ls")["entries"]}
    assert relisted[keys[2]]["expires"].startswith("2099-01-01")
    assert without_expired(relisted.values()) == listing_from_files(mounted)
    index.write_bytes(b"\x00 not json")
    # A damaged index is ignored and rebuilt: the listing is still what the files say, and the
    # new index names every record by its current inode ("expired" aside: the 2 s entry may
    # expire between two listings).
    assert without_expired(run_json(mounted, "cache", "ls")["entries"]) == listing_from_files(mounted)
    rebuilt = json.loads(index.read_bytes())
    records = cache_folder(mounted) / "records"
    assert {name: fields[0] for name, fields in rebuilt["records"].items()} == {
        path.name: path.stat().st_ino for path in records.iterdir()
    }
    rewrite_expiration(cache_folder(mounted) / "records" / keys[2], None)

    limited = run_json(mounted, "cache", "ls", "--limit", "2")
    assert limited["total"] == 4 and [e["key"] for e in limited["entries"]] == [e["key"] for e in entries[:2]]

    table = mounted.run("cache", "ls")
    assert table.returncode == 0, table.stderr
    for key in keys:
        assert key in table.stdout  # whole keys, never shortened
    assert "never" in table.stdout and "compute" in table.stdout and "4 of 4 entries" in table.stdout

    time.sleep(max(0.0, expiring_written + 2.5 - time.monotonic()))
    stats = run_json(mounted, "cache", "stats")
    assert stats["entries"] == 4 and stats["expired"] == 1 and stats["damaged"] == 0
    assert stats["total_bytes"] == sum(entry["size"] for entry in run_json(mounted, "cache", "ls")["entries"])
    assert stats["oldest"] <= stats["newest"]
    assert stats["volume"]["used_bytes"] > 0 and stats["volume"]["total_bytes"] > stats["volume"]["used_bytes"]
    human = mounted.run("cache", "stats")
    assert human.returncode == 0 and "entries" in human.stdout and "expired" in human.stdout and "volume" in human.stdout

    with HeldLock(mounted, keys[0]):
        busy = mounted.run("cache", "rm", keys[0])
    assert busy.returncode == 1 and "being computed right now" in busy.stderr
    assert whole_entry(mounted, keys[0])

    removed = run_json(mounted, "cache", "rm", keys[0], keys[1])
    assert removed == {"removed": [keys[0], keys[1]], "busy": [], "missing": []}
    assert not entry_files(mounted, keys[0]) and not entry_files(mounted, keys[1])
    again = mounted.run("cache", "rm", keys[0])
    assert again.returncode == 1 and f"no cache entry {keys[0]}" in again.stderr

    # A removed entry is simply a miss later.
    rerun = run_json(mounted, "-input", "1")
    assert rerun["key"] == keys[0] and rerun["cache"] == "miss" and rerun["result"]["sum"] == 1


def test_gc_dry_run_expiry_size_and_leftovers(mounted: Sandbox) -> None:
    expiring = [item["key"] for item in run_json(mounted, "-input", "1", "2", "--per-item", "--expire", "2s")["items"]]
    lasting = [item["key"] for item in run_json(mounted, "-input", "3", "4", "5", "--per-item")["items"]]
    root = cache_folder(mounted)
    (root / "data").mkdir(exist_ok=True)  # small results travel inside their records: no payload file yet
    stale = root / "data" / ".tmp-killed-writer"
    stale.write_bytes(b"half an entry")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    fresh = root / "data" / ".tmp-writing-now"
    fresh.write_bytes(b"being written")
    lone_payload = root / "data" / "compute-0123456789abcdef"
    lone_payload.write_bytes(b"a payload whose record is gone")
    idle_lock = root / "locks" / "compute-fedcba9876543210.lock"  # of an entry removed earlier
    idle_lock.write_bytes(b"")
    os.symlink("run-1 host=gone pid=1", root / "locks" / f"{idle_lock.name}.holder")
    dead_holder = root / "locks" / f".tmp-{idle_lock.name}.1.cafe"  # a run killed while naming itself holder
    os.symlink("run-2 host=gone pid=2", dead_holder)
    os.utime(dead_holder, (time.time() - 7200, time.time() - 7200), follow_symlinks=False)
    in_use = sorted(path.name for path in (root / "locks").iterdir() if "compute-fedcba" not in path.name)
    assert len(in_use) == 2 * 5  # a lock file and a holder link for each key run so far

    dry = run_json(mounted, "cache", "gc", "--dry-run")  # no option means --expired
    assert dry["dry_run"] and sorted(r["key"] for r in dry["removed"]) == sorted(expiring)
    assert dry["leftovers_removed"] == 4  # the stale temporaries, the lone payload and the idle lock
    assert {r["reason"] for r in dry["removed"]} == {"expired"}
    assert all(whole_entry(mounted, key) for key in expiring) and stale.exists() and idle_lock.exists()

    with HeldLock(mounted, expiring[0]):
        gc = run_json(mounted, "cache", "gc", "--expired")
    assert [r["key"] for r in gc["removed"]] == [expiring[1]]
    assert gc["skipped"] == [{"key": expiring[0], "why": "busy"}]
    assert whole_entry(mounted, expiring[0]) and not entry_files(mounted, expiring[1])
    assert gc["leftovers_removed"] == 4
    assert not stale.exists() and not lone_payload.exists() and fresh.exists()
    # The lock files of removed entries go too; a key's lock stays while its entry does.
    assert sorted(path.name for path in (root / "locks").iterdir()) == [
        name for name in in_use if not name.startswith(expiring[1])
    ]
    assert run_json(mounted, "cache", "gc", "--expired")["removed"][0]["key"] == expiring[0]

    listed = run_json(mounted, "cache", "ls")["entries"]
    assert sorted(e["key"] for e in listed) == sorted(lasting)
    assert run_json(mounted, "cache", "gc", "--older-than", "1h")["removed"] == []
    human = mounted.run("cache", "gc", "--older-than", "1s", "--dry-run")
    assert human.returncode == 0 and "would remove 3 entries" in human.stdout

    refused = mounted.run("cache", "clear")
    assert refused.returncode == 1 and "nothing removed" in refused.stderr and "--yes" in refused.stderr
    assert run_json(mounted, "cache", "stats")["entries"] == 3
    cleared = run_json(mounted, "cache", "clear", "--yes")
    assert sorted(r["key"] for r in cleared["removed"]) == sorted(e["key"] for e in listed)
    assert run_json(mounted, "cache", "stats")["entries"] == 0
    assert not os.listdir(root / "records")


def set_created(record: Path, created: float) -> None:
    """Rewrite a record's header with another creation time (a new file, as a writer's rename makes)."""
    header, body = record.read_bytes().split(b"\n", 1)
    old = EntryHeader.from_line(header + b"\n")
    write_atomically(record, [dataclasses.replace(old, created=created).to_line(), body])


def test_gc_max_size_removes_the_oldest_first(mounted: Sandbox) -> None:
    """Four entries of different sizes, created hours apart in an order that is neither their key
    order nor their size order; a limit that takes exactly the two oldest to meet."""
    words = ["a" * 200, "b" * 6000, "c" * 1500, "d" * 12000]
    keys = [item["key"] for item in run_json(mounted, "-input", *words, "--per-item")["items"]]
    sizes = {entry["key"]: entry["size"] for entry in run_json(mounted, "cache", "ls")["entries"]}
    assert len(set(sizes.values())) == 4, sizes

    def other_orders(order: tuple[str, ...]) -> bool:
        wrong = [sorted(keys), sorted(keys, reverse=True), sorted(keys, key=sizes.get), sorted(keys, key=sizes.get, reverse=True)]
        return all(list(order[:2]) != orders[:2] for orders in wrong)

    oldest_first = next(order for order in itertools.permutations(keys) if other_orders(order))
    now = time.time()
    for hours, key in zip((4, 3, 2, 1), oldest_first, strict=True):
        set_created(cache_folder(mounted) / "records" / key, now - hours * 3600)

    sizes = {entry["key"]: entry["size"] for entry in run_json(mounted, "cache", "ls")["entries"]}  # new headers
    total = sum(sizes.values())
    limit = total - sizes[oldest_first[0]] - sizes[oldest_first[1]]  # one removal is not enough, two are
    would = run_json(mounted, "cache", "gc", "--max-size", f"{limit}B", "--dry-run")
    assert [(r["key"], r["reason"]) for r in would["removed"]] == [(key, "over size") for key in oldest_first[:2]]
    assert all(whole_entry(mounted, key) for key in keys)
    sized = run_json(mounted, "cache", "gc", "--max-size", f"{limit}B")
    assert [r["key"] for r in sized["removed"]] == list(oldest_first[:2])
    assert sized["remaining_bytes"] == limit
    assert [key for key in keys if entry_files(mounted, key)] == [key for key in keys if key in oldest_first[2:]]


def test_status_on_a_mounted_volume(mounted: Sandbox, prefect_api: str) -> None:
    status = run_json(mounted, "status")
    assert status["volume"]["state"] == "live" and status["volume"]["name"] == "testvol"
    assert status["results"] == {"path": str(cache_folder(mounted)), "shared": True, "read_only": False}
    assert status["storage"]["type"] == "file" and status["storage"]["from"] == "volume"
    assert status["metadata"].startswith("sqlite3://")
    assert status["prefect"] == {"url": prefect_api, "configured": True, "answers": True}
    assert status["signing"] == {"enabled": False, "key_id": None}
    human = mounted.run("status", extra_env={"JUICECACHE_SIGNING_KEY": "k" * 20})
    assert human.returncode == 0, human.stderr
    for fragment in ("mounted at", "testvol", "server answers", "shared on the volume", "signing", "key id"):
        assert fragment in human.stdout
    assert "k" * 20 not in human.stdout


def test_status_without_a_volume_masks_secrets(sandbox: Sandbox) -> None:
    url = f"http://127.0.0.1:{free_port()}/api"
    secret_env = {
        "JFS_META_URL": "redis://:meta-s3cret@127.0.0.1:6379/1",
        "JFS_STORAGE": "s3",
        "JFS_BUCKET": "http://user:bucket-s3cret@127.0.0.1:8333/juicecache",
        "JFS_SECRET_KEY": "secret-key-s3cret",
        "PREFECT_API_URL": url,
    }
    for args in (("status",), ("status", "--json")):
        done = sandbox.run(*args, extra_env=secret_env)
        assert done.returncode == 0, done.stderr
        assert "s3cret" not in done.stdout + done.stderr
        assert "****" in done.stdout
    status = json.loads(sandbox.run("status", "--json", extra_env=secret_env).stdout)
    assert status["volume"]["state"] == "absent" and status["results"]["shared"] is False
    assert status["prefect"] == {"url": url, "configured": True, "answers": False}
    assert "not answering" in sandbox.run("status", extra_env=secret_env).stdout


@pytest.mark.parametrize(
    "args, fragment",
    [
        (("cache",), "required"),
        (("cache", "bogus"), "invalid choice"),
        (("cache", "ls", "--limit", "0"), "positive whole number"),
        (("cache", "gc", "--max-size", "10XB"), "invalid size"),
        (("cache", "gc", "--older-than", "soon"), "invalid duration"),
        (("cache", "rm"), "required"),
        (("cache", "rm", "../etc"), "invalid cache key"),
        (("status", "--bogus"), "unrecognized arguments"),
    ],
)
def test_bad_cache_command_lines(sandbox: Sandbox, args: tuple[str, ...], fragment: str) -> None:
    done = sandbox.run(*args)
    assert done.returncode == 2
    assert_one_line_error(done, fragment)


def test_cache_commands_without_a_volume_use_the_fallback_and_say_so(sandbox: Sandbox) -> None:
    done = sandbox.run("cache", "ls", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"root": str(sandbox.fallback_dir), "total": 0, "entries": []}
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("warning:") and "not mounted" in lines[0]


def test_cache_commands_on_a_dead_mount_fail_in_one_line(mounted: Sandbox) -> None:
    for pid in juicefs_client_pids(mounted.cache_dir):
        os.kill(pid, 9)
    for args in (("cache", "ls"), ("cache", "gc"), ("cache", "stats", "--json")):
        done = mounted.run(*args, timeout=30)
        assert done.returncode == 1
        assert_one_line_error(done, "dead", "start_juice.sh")
    status = mounted.run("status", "--json", timeout=30)
    assert status.returncode == 0 and json.loads(status.stdout)["volume"]["state"] == "dead"


def test_cache_commands_do_not_import_prefect(sandbox: Sandbox) -> None:
    """They stay fast to start: Prefect's import alone takes about a second."""
    probe = "import sys; from juicecache.cli import main; code = main(sys.argv[1:]); print('prefect' in sys.modules); sys.exit(code)"
    for args in (("cache", "ls"), ("status",)):
        done = subprocess.run(
            [sys.executable, "-c", probe, *args], env=sandbox.env, cwd=REPO, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines()[-1] == "False"


def test_a_first_scan_takes_what_writers_journaled(mounted: Sandbox) -> None:
    """Writers append each record they write to their host's journal: a scan takes an entry
    from there, without opening its record, then folds the journal into the listing index."""
    key = run_json(mounted, "-input", "journal", "1")["key"]
    root = cache_folder(mounted)
    journal = root / "index" / f"journal-{socket.gethostname()}"
    assert key in journal.read_text()
    assert journal.stat().st_mode & 0o777 == 0o644
    record = root / "records" / key
    inode = record.stat().st_ino
    os.truncate(record, 10)  # damaged in place: same inode, so only a scan that opens it can tell
    assert record.stat().st_ino == inode

    listed = run_json(mounted, "cache", "ls")["entries"]
    assert [(entry["key"], entry["problem"]) for entry in listed] == [(key, None)]
    assert not journal.exists() and key in (root / "index" / "entries.json").read_text()
    assert not [path.name for path in (root / "index").iterdir() if path.name != "entries.json"]

    (root / "index" / "entries.json").unlink()  # neither journal nor index: the record is read
    listed = run_json(mounted, "cache", "ls")["entries"]
    assert listed[0]["problem"].startswith("damaged record")


def test_a_failed_runs_stored_result_is_listed_as_such_and_collected(mounted: Sandbox) -> None:
    """Prefect stores a failed run's exception beside the entries, under a random name:
    never a hit. It is listed as such, and the first `cache gc` removes it."""
    assert run_flow(mounted, ("square", [3], {}))[0]["state"] == "Completed"
    failed = mounted.run(json.dumps([("guarded", [1, "<lock>"], {})]), script=USER_FLOW, extra_env=ON_PATH)
    assert failed.returncode == 1 and "UnhashableInput" in failed.stderr

    listed = {entry["task"]: entry for entry in run_json(mounted, "cache", "ls")["entries"]}
    assert set(listed) == {"square", "guarded"}
    assert listed["square"]["problem"] is None
    assert listed["guarded"]["problem"] == "not a cache key (a failed or uncached run's result)"
    assert run_json(mounted, "cache", "stats")["damaged"] == 1

    gc = run_json(mounted, "cache", "gc")
    assert [(item["key"], item["reason"]) for item in gc["removed"]] == [(listed["guarded"]["key"], listed["guarded"]["problem"])]
    assert not entry_files(mounted, listed["guarded"]["key"])
    assert run_flow(mounted, ("square", [3], {}))[0]["state"] == "Cached"
