"""The listing index (`index/entries.json` and the writers' journals) only ever speeds `cache ls`
up: a scan that died mid-way, two scans at once, or a damaged index never change what is listed."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

from tests.support.environment import MAIN, Sandbox
from tests.support.runs import cache_folder, listing_from_files, run_json, without_expired


def test_a_journal_left_by_a_crashed_scan_is_taken_once_stale(mounted: Sandbox) -> None:
    """A scan renames each journal aside before reading it; one that died there leaves
    `.tmp-journal-*`. A later scan takes such a file once it is an hour old (a younger one may
    be a live scan's), and removes it."""
    keys = [item["key"] for item in run_json(mounted, "-input", "1", "2", "--per-item")["items"]]
    root = cache_folder(mounted)
    journal = root / "index" / f"journal-{socket.gethostname()}"
    lines = journal.read_text().splitlines()
    assert sorted(json.loads(line)[0] for line in lines) == sorted(keys)
    crashed = root / "index" / f".tmp-journal-{socket.gethostname()}.4242.{time.time_ns()}"
    live = root / "index" / f".tmp-journal-otherhost.4343.{time.time_ns()}"
    os.rename(journal, crashed)
    os.utime(crashed, (time.time() - 7200, time.time() - 7200))
    live.write_text("")
    for key in keys:  # damaged in place (same inode): only the journal's lines can list them as whole
        os.truncate(root / "records" / key, 10)

    listed = run_json(mounted, "cache", "ls")["entries"]
    assert sorted((entry["key"], entry["problem"]) for entry in listed) == sorted((key, None) for key in keys)
    assert not crashed.exists() and live.exists()
    index = json.loads((root / "index" / "entries.json").read_bytes())
    assert sorted(index["records"]) == sorted(keys)


def test_two_scans_at_once_list_the_same_and_leave_a_whole_index(mounted: Sandbox) -> None:
    run_json(mounted, "-input", "1", "2", "3", "--per-item")
    root = cache_folder(mounted)
    command = [sys.executable, str(MAIN), "cache", "ls", "--json"]
    scans = [subprocess.Popen(command, env=mounted.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [scan.communicate(timeout=60) for scan in scans]
    assert all(scan.returncode == 0 for scan in scans), [err for _, err in outputs]
    expected = listing_from_files(mounted)
    for stdout, _ in outputs:
        assert without_expired(json.loads(stdout)["entries"]) == expected
    assert not [path.name for path in (root / "index").iterdir() if path.name != "entries.json"]
    index = json.loads((root / "index" / "entries.json").read_bytes())
    assert {name: fields[0] for name, fields in index["records"].items()} == {
        path.name: path.stat().st_ino for path in (root / "records").iterdir()
    }
    assert without_expired(run_json(mounted, "cache", "ls")["entries"]) == expected


def test_a_damaged_or_foreign_index_is_ignored(mounted: Sandbox) -> None:
    keys = [item["key"] for item in run_json(mounted, "-input", "1", "2", "--per-item")["items"]]
    root = cache_folder(mounted)
    expected = without_expired(run_json(mounted, "cache", "ls")["entries"])  # the journals folded into the index
    assert expected == listing_from_files(mounted)
    index = root / "index" / "entries.json"
    saved = json.loads(index.read_bytes())
    inodes = {key: (root / "records" / key).stat().st_ino for key in keys}
    lying = {key: [inodes[key], 1, "liar", "nowhere", 0.0, None, key, 1, "made up"] for key in keys}
    for damaged in (
        b"",  # empty
        index.read_bytes()[:20],  # truncated
        json.dumps({**saved, "version": 99, "records": lying}).encode(),  # another version's
        json.dumps({"version": saved["version"], "records": {key: [inodes[key], 1] for key in keys}}).encode(),  # wrong shape
    ):
        index.write_bytes(damaged)
        assert without_expired(run_json(mounted, "cache", "ls")["entries"]) == expected, damaged[:60]
