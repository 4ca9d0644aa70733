"""What a cache folder holds: its entries and leftover files, for `cache ls`, `stats` and `gc`.

Prefect has no way to list its result files, so the scan reads the folder directly. It
is built for a shared volume with many entries: listing a folder yields names and inodes
at once, and only the records the listing index has not seen are opened. A record is a
few hundred bytes (its header and Prefect's metadata, which holds the expiration), but
every open on a network file system is a round trip to its metadata engine, so those
reads go to a thread pool. No Prefect import: the admin commands stay fast to start.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path

from juicecache.entryfile import CACHE_KEY, DATA, LOCKS, PARAMETERS, RECORDS, TEMP_PREFIX
from juicecache.listing import ListingIndex, RecordInfo, read_record
from juicecache.locking import lock_file_name

# Beyond a few threads, an embedded volume's client is the bottleneck, not the waiting.
WORKERS = 8
_BATCH = 256
NOT_A_CACHE_KEY = "not a cache key (a failed or uncached run's result)"

Progress = Callable[[int, int], None]  # (done, total)


@dataclass(frozen=True)
class Entry:
    """One cache entry as the scan found it; `problem` says why it can never be a hit."""

    key: str
    inode: int
    task: str | None
    host: str | None
    created: float | None
    expires: float | None
    record_bytes: int
    payload_bytes: int | None
    problem: str | None = None
    code: str | None = None  # the short digest of the code it was computed with
    seconds: float | None = None  # how long computing it took (what a hit saves)

    @property
    def size(self) -> int:
        return self.record_bytes + (self.payload_bytes or 0)

    def is_expired(self, now: float) -> bool:
        return self.expires is not None and self.expires <= now

    def as_dict(self, now: float) -> dict[str, object]:
        return {
            "key": self.key,
            "task": self.task,
            "host": self.host,
            "created": _iso(self.created),
            "expires": _iso(self.expires),
            "expired": self.is_expired(now),
            "size": self.size,
            "problem": self.problem,
            "code": self.code,
            "seconds": self.seconds,
        }


@dataclass(frozen=True)
class Leftover:
    """A file that belongs to no complete entry: a dead writer's temporary, a lone payload or lock."""

    path: Path
    kind: str  # "temporary", "payload", "lock" or "parameters"
    size: int
    modified: float


@dataclass
class Scan:
    root: Path
    entries: list[Entry]  # newest first
    leftovers: list[Leftover]
    scanned_at: float = field(default_factory=time.time)

    @property
    def total_bytes(self) -> int:
        return sum(entry.size for entry in self.entries)


def scan(root: Path, progress: Progress | None = None, full: bool = True, workers: int = WORKERS) -> Scan:
    """Every entry under `root`, newest first.

    Args:
        root: the cache folder (`records/`, `data/`, `locks/`, … below it).
        progress: called with (records read, records to read) as the unseen records are read.
        full: also list payloads and locks: finds the leftovers `gc` removes and payloads
            removed behind the cache's back; `ls` and `stats` do without.
        workers: threads reading records.
    """
    record_inodes, record_temporaries = _list(root / RECORDS)
    index = ListingIndex.load(root)
    journals = index.fold_journals(root)
    infos = {name: index.records[name] for name, inode in record_inodes.items() if name in index.records and index.records[name].inode == inode}
    unread = sorted(name for name in record_inodes if name not in infos)
    leftovers: list[Leftover] = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        done = 0
        for batch in pool.map(lambda chunk: [(name, read_record(root, name, record_inodes[name])) for name in chunk], _chunks(unread)):
            infos.update((name, info) for name, info in batch if info is not None)
            done += len(batch)
            if progress:
                progress(done, len(unread))
        if unread or journals or len(infos) != len(index.records):
            ListingIndex(infos).save(root, folded=journals)
        if full:
            # Listed after the records: a listed record's payload, written before it, is
            # in this listing unless it was removed since.
            payload_inodes, payload_temporaries = _list(root / DATA)
            named = {info.payload for info in infos.values()}
            infos = {
                name: info if info.payload is None or info.payload in payload_inodes else replace(info, payload_bytes=None)
                for name, info in infos.items()
            }
            lock_names, lock_temporaries = _list(root / LOCKS)
            parameter_names, parameter_temporaries = _list(root / PARAMETERS)
            temporaries = record_temporaries + payload_temporaries + lock_temporaries + parameter_temporaries
            leftovers = _describe(pool, temporaries, "temporary")
            leftovers += _describe(pool, [root / DATA / name for name in payload_inodes if name not in named], "payload")
            leftovers += _lone_locks(root / LOCKS, lock_names, record_inodes)
            leftovers += _describe(pool, [root / PARAMETERS / name for name in parameter_names], PARAMETERS)
    entries = [_entry(name, info) for name, info in infos.items()]
    entries.sort(key=lambda entry: (entry.created or 0.0, entry.key), reverse=True)
    return Scan(root, entries, leftovers)


def _list(folder: Path) -> tuple[dict[str, int], list[Path]]:
    """Names (with their inode, free from the listing) and temporary files in `folder`."""
    names: dict[str, int] = {}
    temporaries: list[Path] = []
    try:
        with os.scandir(folder) as listing:
            for item in listing:
                if item.name.startswith(TEMP_PREFIX):
                    temporaries.append(Path(item.path))
                elif not item.name.startswith("."):
                    names[item.name] = item.inode()
    except FileNotFoundError:
        pass
    return names, temporaries


def _lone_locks(folder: Path, names: Iterable[str], keys: Iterable[str]) -> list[Leftover]:
    """Lock files (and holder links) of keys without a record: their entry was removed, or
    its key is being computed for the first time (then its lock is held, and it stays)."""
    in_use = {lock_file_name(key) for key in keys}
    lone = {name.removesuffix(".holder") for name in names} - in_use
    return [Leftover(folder / name, "lock", 0, 0.0) for name in sorted(lone) if name.endswith(".lock")]


def _chunks(names: Sequence[str]) -> Iterator[Sequence[str]]:
    """Batches keep the pool's per-task overhead small next to the I/O."""
    for start in range(0, len(names), _BATCH):
        yield names[start : start + _BATCH]


def _entry(key: str, info: RecordInfo) -> Entry:
    problem = info.problem or (None if info.payload_bytes is not None else "payload missing")
    if problem is None and not CACHE_KEY.fullmatch(key):
        problem = NOT_A_CACHE_KEY
    return Entry(
        key, info.inode, info.task, info.host, info.created, info.expires, info.size, info.payload_bytes, problem,
        info.code, info.seconds,
    )


def _describe(pool: ThreadPoolExecutor, paths: list[Path], kind: str) -> list[Leftover]:
    def describe(path: Path) -> Leftover | None:
        try:
            status = os.lstat(path)  # a dead run's temporary holder link points nowhere
        except FileNotFoundError:
            return None
        return Leftover(path, kind, status.st_size, status.st_mtime)

    return [leftover for leftover in pool.map(describe, paths) if leftover is not None]


def _iso(timestamp: float | None) -> str | None:
    return None if timestamp is None else datetime.fromtimestamp(timestamp).astimezone().isoformat(timespec="seconds")


# --- statistics -----------------------------------------------------------------------


@dataclass(frozen=True)
class VolumeUsage:
    """What the file system holding the cache says about itself (JuiceFS reports its real usage)."""

    total_bytes: int
    used_bytes: int
    free_bytes: int
    used_inodes: int

    @classmethod
    def of(cls, path: Path) -> VolumeUsage:
        status = os.statvfs(path)
        total = status.f_blocks * status.f_frsize
        free = status.f_bavail * status.f_frsize
        return cls(total, total - status.f_bfree * status.f_frsize, free, status.f_files - status.f_ffree)


@dataclass(frozen=True)
class Stats:
    entries: int
    total_bytes: int
    expired: int
    damaged: int
    oldest: float | None
    newest: float | None

    @classmethod
    def of(cls, found: Scan) -> Stats:
        created = [entry.created for entry in found.entries if entry.created is not None]
        return cls(
            entries=len(found.entries),
            total_bytes=found.total_bytes,
            expired=sum(entry.is_expired(found.scanned_at) for entry in found.entries),
            damaged=sum(entry.problem is not None for entry in found.entries),
            oldest=min(created, default=None),
            newest=max(created, default=None),
        )

    def as_dict(self) -> dict[str, object]:
        return {**self.__dict__, "oldest": _iso(self.oldest), "newest": _iso(self.newest)}
