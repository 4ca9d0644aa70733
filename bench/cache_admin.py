"""Benchmark: `cache ls`, `cache stats` and `cache gc` on 100,000 entries on a real JuiceFS volume.

    python bench/cache_admin.py [--entries 100000] [--workdir DIR] [--keep]

Formats and mounts an embedded volume (SQLite metadata, a local folder as object
storage) in a temporary folder, writes the entries with the real writer (`EntryStorage`:
Prefect's own result records, atomic files with checked headers), remounts so that no
page cache helps, then times, in one run:

- the baseline: listing `records/` with a plain `os.scandir` (names only);
- a naive serial loop reading every record (what a script without a pool would do);
- the library scan behind `cache ls`/`cache stats`, and both commands end to end;
- `cache gc --dry-run --max-size`, then a real `cache gc --expired`.

Results go to bench/results-cache-admin.md, with each figure's ratio to the baseline.
`--workdir DIR --keep` keeps the volume for another run (writing 100,000 entries takes
minutes on an embedded volume: every file is fsynced).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from juicecache.entryfile import DATA, LOCKS, RECORDS, Signer  # noqa: E402
from juicecache.listing import ListingIndex  # noqa: E402
from juicecache.scan import WORKERS  # noqa: E402
from tests.support.environment import sandbox_env  # noqa: E402

RESULTS = REPO / "bench" / "results-cache-admin.md"
EXPIRED_SHARE = 100  # one entry in 100 has expired
REMOVED = 1_000
TASKS = ("compute", "train", "featurize", "report")


def volume_env(workdir: Path) -> dict[str, str]:
    """An embedded volume under `workdir`; the `cache` commands need no Prefect server."""
    return sandbox_env(workdir, api_url="")


def main_py(env: dict[str, str], *args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, str(REPO / "main.py"), *args], env=env, capture_output=True, text=True, timeout=1800)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"main.py {' '.join(args)} failed: {done.stderr.strip()}")
    return done, seconds


def write_entries(root: Path, count: int, first: int = 0) -> float:
    """Entries `first`..`count` through the real writer (Prefect result records in `EntryStorage`).

    Each also gets its lock file, as the runs that compute entries leave one.
    """
    os.environ.setdefault("PREFECT_HOME", str(root.parent / "prefect-home"))
    from prefect.results import ResultRecord, ResultRecordMetadata
    from prefect.serializers import PickleSerializer

    import juicecache.storage as storage

    # No Prefect task runs here, so the header's task name comes from the benchmark.
    writing = threading.local()
    storage._current_task = lambda: {"task": writing.task, "code": None, "seconds": None}
    config = storage.StoreConfig(root, Signer(b""))
    records = storage.EntryStorage.create(RECORDS, lambda: config)
    payloads = storage.EntryStorage.create(DATA, lambda: config)
    now = datetime.now(UTC)

    def write(index: int) -> None:
        writing.task = TASKS[index % len(TASKS)]
        key = f"{writing.task}-{index:040x}"
        expired = index % EXPIRED_SHARE == 0
        expiration = now - timedelta(hours=1) if expired else (now + timedelta(days=7) if index % 2 else None)
        record = ResultRecord(
            result={"value": index, "padding": "x" * (index % 2000)},
            metadata=ResultRecordMetadata(
                storage_key=key, expiration=expiration, serializer=PickleSerializer(), storage_block_id=storage.BLOCK_ID
            ),
        )
        payloads.write_path(key, record.serialize_result())
        records.write_path(key, record.serialize_metadata())
        os.close(os.open(root / LOCKS / f"{key}.lock", os.O_RDWR | os.O_CREAT, 0o644))

    (root / LOCKS).mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=16) as pool:
        for done, _ in enumerate(pool.map(write, range(first, count)), 1):
            if done % 10_000 == 0:
                print(f"  wrote {done:,} entries ({time.perf_counter() - started:.0f} s)", flush=True)
    return time.perf_counter() - started


def remount(env: dict[str, str]) -> None:
    """A fresh mount: nothing of the written files is left in this client's page cache."""
    main_py(env, "unmount")
    main_py(env, "mount")


def cold_listing(env: dict[str, str], root: Path) -> float:
    """The baseline: list the records folder by name, after a remount, as plainly as Python can."""
    remount(env)
    _, seconds = timed(lambda: sum(1 for _ in os.scandir(root / RECORDS)))
    return seconds


def timed(function) -> tuple[object, float]:
    started = time.perf_counter()
    value = function()
    return value, time.perf_counter() - started


def serial_read(folder: Path) -> int:
    total = 0
    for item in os.scandir(folder):
        with open(item.path, "rb") as handle:
            total += len(handle.read())
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--workdir", type=Path, help="keep the volume here (reused when it holds one)")
    parser.add_argument("--keep", action="store_true", help="leave the volume mounted and in place")
    args = parser.parse_args()

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="juicecache-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    env = volume_env(workdir)
    root = workdir / "mnt" / "prefect-cache"
    try:
        main_py(env, "mount")
        existing = len(os.listdir(root / RECORDS)) if (root / RECORDS).exists() else 0
        write_seconds = None
        if existing < args.entries:
            print(f"writing {args.entries - existing:,} entries ...", flush=True)
            write_seconds = write_entries(root, args.entries, first=existing)
        entries = len(os.listdir(root / RECORDS))
        figures: list[tuple[str, float, str]] = []

        baselines = [cold_listing(env, root)]

        remount(env)
        _, serial = timed(lambda: serial_read(root / RECORDS))
        figures.append(("naive: read every record, one thread", serial, ""))

        ListingIndex.path(root).unlink(missing_ok=True)
        remount(env)
        done, cold = main_py(env, "cache", "stats", "--json")
        stats = json.loads(done.stdout)
        first_scan = "`cache stats --json`, first scan (no listing index yet: folds the writers' journals)"
        figures.append((first_scan, cold, f"{stats['entries']:,} entries"))
        baselines.append(cold_listing(env, root))

        ListingIndex.path(root).unlink()
        remount(env)
        done, unaided = main_py(env, "cache", "stats", "--json")
        without = f"`cache stats --json` with neither index nor journals (reads every record, {WORKERS} threads)"
        figures.append((without, unaided, f"{json.loads(done.stdout)['entries']:,} entries"))

        remount(env)
        done, warm = main_py(env, "cache", "stats", "--json")
        figures.append(("`cache stats --json` (listing index from the previous scan)", warm, f"{json.loads(done.stdout)['expired']:,} expired"))

        remount(env)
        done, ls_seconds = main_py(env, "cache", "ls", "--json", "--limit", "20")
        figures.append(("`cache ls --json --limit 20`", ls_seconds, f"total {json.loads(done.stdout)['total']:,}"))

        done, ls_table = main_py(env, "cache", "ls")
        figures.append(("`cache ls` (every entry, to a pipe)", ls_table, f"{len(done.stdout.splitlines()):,} lines"))

        half = stats["total_bytes"] // 2
        done, dry_seconds = main_py(env, "cache", "gc", "--dry-run", "--max-size", str(half), "--json")
        would_remove = len(json.loads(done.stdout)["removed"])
        figures.append((f"`cache gc --dry-run --max-size {half}` (plans only)", dry_seconds, f"would remove {would_remove:,}"))

        # Removes about REMOVED entries (the expired ones, then the oldest), which the next step adds back.
        bound = int(stats["total_bytes"] * (1 - REMOVED / stats["entries"]))
        done, gc_seconds = main_py(env, "cache", "gc", "--expired", "--max-size", str(bound), "--json")
        removed = len(json.loads(done.stdout)["removed"])
        figures.append((f"`cache gc --expired --max-size {bound}` (removes each under its key's lock)", gc_seconds, f"removed {removed:,}"))

        remount(env)
        newest = max(int(name.rsplit("-", 1)[1], 16) for name in os.listdir(root / RECORDS)) + 1
        write_entries(root, newest + removed, first=newest)
        done, after = main_py(env, "cache", "stats", "--json")
        figures.append((f"`cache stats --json` after {removed:,} new entries", after, f"{json.loads(done.stdout)['entries']:,} entries"))
        baselines.append(cold_listing(env, root))

        baseline = min(baselines)
        figures.insert(0, ("baseline: `os.scandir(records/)`, names only (best of 3)", baseline, ""))
        report(entries, write_seconds, figures, removed, gc_seconds - dry_seconds)
    finally:
        if not args.keep:
            subprocess.run([sys.executable, str(REPO / "main.py"), "unmount"], env=env, capture_output=True, timeout=120)
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


def report(entries: int, write_seconds: float | None, figures: list[tuple[str, float, str]], removed: int, removal_seconds: float) -> None:
    baseline = figures[0][1]
    lines = [
        "# Benchmark: cache admin commands on a large cache",
        "",
        f"`python bench/cache_admin.py --entries {entries}` on {datetime.now().strftime('%Y-%m-%d')}: "
        f"{os.cpu_count()} CPUs (shared), Python {platform.python_version()}, an embedded JuiceFS volume "
        "(SQLite metadata, local folder as object storage), remounted before each measurement marked so "
        "that no page cache helps. Commands are timed end to end (`python main.py ...`, interpreter start included).",
        "",
        f"{entries:,} entries (record, payload and lock file each; one in {EXPIRED_SHARE} expired)"
        + (f", written in {write_seconds:.0f} s by the real writer (16 threads)." if write_seconds else "."),
        "",
        "| what | seconds | × baseline | note |",
        "|---|---:|---:|---|",
    ]
    for name, seconds, note in figures:
        lines.append(f"| {name} | {seconds:.2f} | {seconds / baseline:.1f} | {note} |")
    lines += [
        "",
        f"Removing {removed:,} entries took about {removal_seconds:.1f} s beyond the scan "
        f"({removal_seconds / max(removed, 1) * 1000:.1f} ms each: lock, record, payload, lock file), "
        "bounded by the metadata engine's write rate.",
    ]
    text = "\n".join(lines) + "\n"
    RESULTS.write_text(text)
    print(text)


if __name__ == "__main__":
    sys.exit(main())
