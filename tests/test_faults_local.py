"""Faults on one machine's embedded volume, with real processes and real full disks.

The JuiceFS client killed mid-run, the disk under each of the cache's folders full (a
small tmpfs: the local fallback, the volume's object storage, JuiceFS's block cache), and
a writer killed with SIGKILL at random moments, 20 times. Each test adds a row to the
summary table printed at the end (tests/support/fault_report.py).
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from juicecache.volume import MountState, mount_info
from tests.support.environment import REPO, Sandbox, juicefs_client_pids
from tests.support.fault_report import FaultReport
from tests.support.processes import wait_until

pytestmark = pytest.mark.faults

START = REPO / "start_juice.sh"
STOP = REPO / "stop_juice.sh"
DRIVER = Path(__file__).parent / "support" / "fault_driver.py"
RESULTS = "prefect-cache"
STORAGE_WARNING = "warning: the cache storage failed"


def demo(box: Sandbox, *values: str) -> tuple[subprocess.CompletedProcess[str], dict | None]:
    done = box.run("-input", *values, "--json")
    return done, json.loads(done.stdout) if done.returncode == 0 else None


def entry_files(folder: Path, key: str) -> list[Path]:
    """Every record, payload or temporary file of `key` under a cache folder."""
    return [path for kind in ("records", "data") if (folder / kind).is_dir() for path in (folder / kind).iterdir() if key in path.name]


@contextmanager
def small_disk(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` at `path`, unmounted on exit whatever happened."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(folder: Path) -> Path:
    """Write a file until the disk says ENOSPC; delete the file to free the space."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * (1 << 16))
    except OSError as exc:
        assert exc.errno == errno.ENOSPC, exc
    finally:
        os.close(fd)
    return filler


def test_client_killed_mid_run_then_scripts_recover(sandbox: Sandbox, fault_report: FaultReport) -> None:
    """The client dies while a run holds a key's lock: JuiceFS keeps that lock for the dead
    client's session until the session expires, 5 heartbeats after its last one (60 s with
    the default --heartbeat of 12 s; 2 s here, so the test waits 10 s, not a minute)."""
    sandbox.env["JFS_MOUNT_OPTIONS"] = "--heartbeat 2s"
    sandbox.use_default_demo_seconds()  # the run is still computing when its client is killed
    mounted = sandbox.run("mount", timeout=90)
    assert mounted.returncode == 0, mounted.stderr
    kept, _ = demo(sandbox, "kept", "before", "the", "crash")
    assert kept.returncode == 0, kept.stderr
    locks = sandbox.mount_point / RESULTS / "locks"
    before = set(locks.iterdir())
    victim = subprocess.Popen(
        [sys.executable, str(REPO / "main.py"), "-input", "killed", "mid", "run"], env=sandbox.env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
    )
    try:
        assert wait_until(lambda: set(locks.iterdir()) - before, 60), "the run never took its lock"
        for pid in juicefs_client_pids(sandbox.cache_dir):
            os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        _, stderr = victim.communicate(timeout=60)
        noticed = time.monotonic() - killed
    finally:
        if victim.poll() is None:
            victim.kill()
    lines = stderr.strip().splitlines()
    assert victim.returncode == 1 and len(lines) == 1 and "Traceback" not in stderr, stderr
    assert "transport endpoint is not connected" in lines[0] or "dead" in lines[0], lines[0]
    assert mount_info(sandbox.mount_point).state is MountState.DEAD

    assert sandbox.run(script=STOP).returncode == 0
    started = sandbox.run(script=START)
    assert started.returncode == 0, started.stderr
    assert mount_info(sandbox.mount_point).state is MountState.LIVE
    again, report = demo(sandbox, "kept", "before", "the", "crash")
    assert again.returncode == 0 and report["cache"] == "hit", again.stderr  # the stored entry survived
    assert report["result"] == json.loads(kept.stdout)["result"]
    retried, retry = demo(sandbox, "killed", "mid", "run")  # waits for the dead session's lock to go
    released = time.monotonic() - killed
    assert retried.returncode == 0 and retry["cache"] == "miss" and retry["result"]["text"] == "killed mid run"
    fault_report.add(
        "JuiceFS client killed (SIGKILL) during a run; mount left dead",
        "one error line; stop_juice.sh + start_juice.sh recover it; entries stored before are hits; "
        "the key it was computing is computed once its dead session expires",
        f"the run failed {noticed:.1f} s after the kill; the key was free again {released:.0f} s after it "
        "(heartbeat 2 s here: 60 s with JuiceFS's default)",
    )


def test_full_fallback_disk(sandbox: Sandbox, fault_report: FaultReport) -> None:
    """Volume not mounted: the local fallback folder is on a full disk."""
    with small_disk(sandbox.fallback_dir, "1m") as disk:
        filler = fill(disk)
        full, report = demo(sandbox, "fallback", "disk", "full")
        assert full.returncode == 0 and report["cache"] == "miss", full.stderr
        assert report["result"]["text"] == "fallback disk full"  # the right value, computed anyway
        warnings = [line for line in full.stderr.splitlines() if line.startswith(STORAGE_WARNING)]
        assert len(warnings) == 1 and "No space left on device" in warnings[0] and "Traceback" not in full.stderr, full.stderr
        assert not entry_files(disk, report["key"]), "a partial entry is visible"
        filler.unlink()
        stored, _ = demo(sandbox, "fallback", "disk", "full")
        hit, hit_report = demo(sandbox, "fallback", "disk", "full")
        assert STORAGE_WARNING not in stored.stderr and hit_report["cache"] == "hit"
    fault_report.add(
        "local fallback folder on a full disk (1 MB tmpfs)",
        "right value, one warning line, no partial entry; stored once space is back",
        "",
    )


def test_full_object_storage(sandbox: Sandbox, fault_report: FaultReport) -> None:
    """The embedded volume's objects (JFS_BUCKET) on a disk that fills up after mounting."""
    with small_disk(sandbox.path / "objects", "32m") as disk:
        sandbox.env["JFS_BUCKET"] = str(disk)
        mounted = sandbox.run("mount", timeout=90)
        assert mounted.returncode == 0, mounted.stderr
        try:
            filler = fill(disk)
            started = time.monotonic()
            full, report = demo(sandbox, "volume", "disk", "full")
            seconds = time.monotonic() - started
            assert full.returncode == 0 and report["cache"] == "miss", full.stderr
            assert report["result"]["text"] == "volume disk full"
            warnings = [line for line in full.stderr.splitlines() if line.strip()]
            assert len(warnings) == 1 and warnings[0].startswith(f"{STORAGE_WARNING} (Input/output error"), full.stderr
            assert not entry_files(sandbox.mount_point / RESULTS, report["key"]), "a partial entry is visible"
            filler.unlink()
            stored, _ = demo(sandbox, "volume", "disk", "full")
            hit, hit_report = demo(sandbox, "volume", "disk", "full")
            assert not stored.stderr.strip() and hit_report["cache"] == "hit", stored.stderr
        finally:
            sandbox.run("unmount")  # before its object storage's disk goes
    fault_report.add(
        "volume's object storage on a full disk (tmpfs filled after mounting)",
        "right value, one warning line, no partial entry; stored once space is back",
        f"the run took {seconds:.1f} s (JuiceFS gives up after 4 tries)",
    )


def test_full_juicefs_cache_dir(sandbox: Sandbox, fault_report: FaultReport) -> None:
    """JuiceFS's local block cache (JFS_CACHE_DIR) on a full disk: it is only a cache."""
    with small_disk(sandbox.cache_dir, "8m") as disk:
        mounted = sandbox.run("mount", timeout=90)
        assert mounted.returncode == 0, mounted.stderr
        try:
            fill(disk)
            first, report = demo(sandbox, "block", "cache", "full")
            second, again = demo(sandbox, "block", "cache", "full")
        finally:
            sandbox.run("unmount")  # before its cache's disk goes
    assert first.returncode == 0 and report["cache"] == "miss" and not first.stderr.strip(), first.stderr
    assert second.returncode == 0 and again["cache"] == "hit" and again["result"] == report["result"], second.stderr
    fault_report.add(
        "JuiceFS block cache dir (JFS_CACHE_DIR) on a full disk (8 MB tmpfs)",
        "runs unaffected: JuiceFS stops caching locally, entries go to object storage",
        "",
    )


class Zygote:
    """tests/support/fault_driver.py --zygote: forks a fresh writer process per spec, cheaply."""

    def __init__(self, box: Sandbox) -> None:
        env = {**box.env, "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "WARNING", "PYTHONPATH": str(REPO)}
        self.process = subprocess.Popen(
            [sys.executable, str(DRIVER), "--zygote"], env=env, cwd=REPO, text=True,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        )
        self.lines: list[dict] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(json.loads(line))

    def fork(self, spec: dict) -> int:
        """Start a child running `spec`; its pid."""
        known = len([line for line in self.lines if "child" in line])
        self.process.stdin.write(json.dumps(spec) + "\n")
        self.process.stdin.flush()
        assert wait_until(lambda: len([line for line in self.lines if "child" in line]) > known, 60, 0.01)
        return [line for line in self.lines if "child" in line][known]["child"]

    def runs(self, pid: int) -> list[dict]:
        return [line for line in self.lines if line.get("pid") == pid]

    def close(self) -> None:
        """No more specs: the zygote exits (killed if it does not); children finish on their own."""
        self.process.stdin.close()
        try:
            self.process.wait(timeout=30)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()


def alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def test_writer_killed_20_times(mounted: Sandbox, fault_report: FaultReport) -> None:
    """Writers overwrite (refresh) entries of a few MB; each is SIGKILLed at a random moment.

    The moments are drawn around the writes: after a random call's body has run (its marker
    line appears), within 1.5 x the time storing a result took in a calibration run; every
    other time, within 10 ms of the writer opening an entry file for writing (inside a write).
    Whether a writer was inside a write when killed is read from its open files just before
    the kill (whatever the file is named, so a writer writing entries in place counts too),
    and enough kills must have landed there: otherwise the test would prove nothing.
    """
    keys = [f"kill-{i}" for i in range(3)]
    markers = mounted.path / "markers.jsonl"
    spec = {"calls": [{"key": key, "refresh": True} for key in keys], "payload_bytes": 4 << 20, "work_seconds": 0.05,
            "markers": str(markers)}
    zygote = Zygote(mounted)
    chooser = random.Random()
    try:
        calibration = zygote.fork(spec)
        assert wait_until(lambda: not alive(calibration), 120, 0.01)
        assert [run["state"] for run in zygote.runs(calibration)] == ["Completed"] * len(keys)
        computed = {line["key"]: line["end"] for line in read_markers(markers) if line["pid"] == calibration}
        writing = max(run["end"] - computed[run["key"]] for run in zygote.runs(calibration))
        kills: list[bool] = []  # killed before finishing its calls
        mid_write: list[bool] = []  # killed with an entry file open for writing
        damaged: list[str] = []  # visible entry files that fail their checksum right after a kill
        results = mounted.mount_point / RESULTS
        for round_number in range(20):
            call = chooser.randrange(len(keys))
            pid = zygote.fork(spec)
            wait_until(lambda pid=pid, call=call: len(bodies_run(markers, pid)) > call or not alive(pid), 60, 0.005)
            if round_number % 2:  # every other time, right inside a file write: once it has an entry file open to write
                wait_until(lambda pid=pid: writing_entry_files(results, pid) or not alive(pid), 10, 0.002)
                time.sleep(chooser.uniform(0.0, 0.01))
            else:
                time.sleep(chooser.uniform(0.0, 1.5 * writing))
            inside = writing_entry_files(results, pid)  # what it was writing at the kill (microseconds before it)
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
            assert wait_until(lambda pid=pid: not alive(pid), 30, 0.01)
            kills.append(len(zygote.runs(pid)) < len(keys))
            # Inside a write: it had an entry file open for writing, or left a temporary behind.
            left = list(results.glob(f"*/.tmp-*.{pid}.*"))
            mid_write.append(kills[-1] and bool(inside or left))
            # Right after each kill, before the next writer can mend anything: no visible entry is partial.
            damaged.extend(f"round {round_number}: {problem}" for problem in visible_entry_problems(results))
        reader = zygote.fork({**spec, "calls": [{"key": key} for key in keys]})
        assert wait_until(lambda: not alive(reader), 120, 0.01)
        after = zygote.runs(reader)
    finally:
        zygote.close()
    # Half the rounds aim inside a write of 4 MB: if fewer than 4 of 20 kills landed there, the
    # claim "a writer killed mid-write leaves no partial entry" went untested.
    assert sum(mid_write) >= 4, f"only {sum(mid_write)} of 20 kills landed mid-write: the test proved nothing"
    assert not damaged, damaged[:5]
    assert len(after) == len(keys)
    assert all(run["state"] in ("Cached", "Completed") and run["value_ok"] for run in after), after
    assert not [w for run in after for w in run["warnings"]], "an entry was refused or unreadable"
    hits = sum(run["state"] == "Cached" for run in after)
    assert not visible_entry_problems(results)
    leftovers = sum(path.name.startswith(".tmp-") for kind in ("records", "data") for path in (results / kind).iterdir())
    fault_report.add(
        f"writer SIGKILLed at a random moment around its writes, 20 times ({len(keys)} entries of 4 MB rewritten each time)",
        "0 wrong or unreadable hits afterwards; every visible entry file passes its checksum",
        f"{sum(kills)} writers killed before finishing, {sum(mid_write)} of them inside a write "
        f"({leftovers} temporaries left, invisible to readers); "
        f"afterwards {hits} hits, {len(keys) - hits} misses",
    )


def read_markers(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def bodies_run(path: Path, pid: int) -> list[dict]:
    return [line for line in read_markers(path) if line["pid"] == pid]


def writing_entry_files(results: Path, pid: int) -> list[str]:
    """The entry files (records/, data/, temporaries included) process `pid` has open for writing,
    from /proc: whatever they are named, so in-place writes would count as much as temporaries."""
    folders = tuple(f"{results / kind}/" for kind in ("records", "data"))
    found = []
    try:
        descriptors = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return []
    for fd in descriptors:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            flags = next(line for line in Path(f"/proc/{pid}/fdinfo/{fd}").read_text().splitlines() if line.startswith("flags:"))
        except (OSError, StopIteration):
            continue
        if target.startswith(folders) and int(flags.split()[1], 8) & (os.O_WRONLY | os.O_RDWR):
            found.append(target)
    return found


def visible_entry_problems(results: Path) -> list[str]:
    """Every entry file a reader can see (not a temporary) that fails its checksum, and why."""
    from juicecache.entryfile import TEMP_PREFIX, EntryHeader, EntryRefused, Signer

    problems = []
    for path in [path for kind in ("records", "data") if (results / kind).is_dir() for path in (results / kind).iterdir()]:
        if path.name.startswith(TEMP_PREFIX):
            continue
        try:
            with open(path, "rb") as handle:
                header = EntryHeader.from_line(handle.readline())
                Signer().check(f"{path.parent.name}/{path.name}", header, handle.read())
        except FileNotFoundError:  # replaced between the listing and the open
            continue
        except EntryRefused as refused:
            problems.append(f"{path.parent.name}/{path.name}: {refused}")
    return problems
