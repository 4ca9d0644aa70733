"""Cache entry inspection and garbage collection: what `cache ls/stats/rm/clear/gc` do.

Prefect never deletes result files and has no way to list them, so this module reads
the cache folder directly. It is built for a shared volume with many entries:

- a scan lists the folders (names and inodes come at once) and opens only the records
  the listing index has not seen yet: a record is a few hundred bytes (its header and
  Prefect's metadata, which holds the expiration), but every open on a network file
  system is a round trip to its metadata engine, so those reads go to a thread pool;
- removing an entry first takes the key's lock without waiting (the lock a run holds
  while it looks up, computes or reads that key), so nothing being written or read
  right now is touched; the record goes first, then the payload, so a reader never
  finds a record whose payload is gone. A removed entry is simply a miss later.

No Prefect import here: the admin commands stay fast to start.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime
from enum import Enum
from pathlib import Path

from juicecache.entryfile import (
    CACHE_KEY,
    DATA,
    LOCKS,
    PARAMETERS,
    RECORDS,
    TEMP_PREFIX,
    EntryHeader,
    EntryRefused,
    makedirs_0755,
    write_atomically,
)
from juicecache.locking import FlockLockManager, holder_path, lock_file_name

# Temporary files untouched this long belong to a writer that died (a live one keeps writing).
STALE_TEMPORARY_SECONDS = 3600.0
# Background runs' parameters (`PARAMETERS`): a task worker reads them when it picks the run
# up, normally within seconds, but a run waits in the Prefect server's queue for as long as no
# worker serves its task; removed before, the run fails. Prefect itself never removes them:
# `gc` does once they are this old.
STALE_PARAMETERS_SECONDS = 7 * 24 * 3600.0
# Records are small; anything larger is not one of ours and is not read whole.
MAX_RECORD_BYTES = 1 << 16
# Beyond a few threads, an embedded volume's client is the bottleneck, not the waiting.
WORKERS = 8
INDEX = "index"
JOURNAL_PREFIX = "journal-"
_BATCH = 256

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


@dataclass(frozen=True)
class RecordInfo:
    """What one record file says, remembered by the listing index under its inode."""

    inode: int
    size: int
    task: str | None
    host: str | None
    created: float | None
    expires: float | None
    payload: str
    payload_bytes: int | None  # None: no payload when the record was read
    problem: str | None
    code: str | None = None  # last, with defaults: journals and indexes written before them still load
    seconds: float | None = None


class ListingIndex:
    """What earlier scans read, so a scan only opens records that are new since.

    Opening a file costs round trips to the metadata engine (most of a millisecond on a
    busy embedded volume), so reading 100,000 records takes a minute or more, while
    listing a folder yields every name with its inode at once. An entry is rewritten
    payload first, then record, each by rename, which gives the new file a new inode: a
    record whose inode matches the index is unchanged, and so is its payload. The index
    only speeds up listing: anything unreadable in it is ignored, and no cache lookup
    ever reads it.

    Writers add to it too, so that even the first scan of a large cache opens no record:
    each record written appends one line (what a scan would read from it, and its inode)
    to its host's journal, `index/journal-HOST` (see `note_record`). A scan folds the
    journals into the index and removes them. A line that is lost (two hosts with one
    name, a writer killed mid-line, a scan folding meanwhile) only means that record is
    read the usual way.
    """

    VERSION = 1

    def __init__(self, records: dict[str, RecordInfo]) -> None:
        self.records = records

    @staticmethod
    def path(root: Path) -> Path:
        return root / INDEX / "entries.json"

    @classmethod
    def load(cls, root: Path) -> ListingIndex:
        try:
            saved = json.loads(cls.path(root).read_bytes())
            if saved["version"] != cls.VERSION:
                raise ValueError("another version")
            return cls({name: RecordInfo(*fields) for name, fields in saved["records"].items()})
        except (OSError, ValueError, TypeError, KeyError):
            return cls({})

    def save(self, root: Path) -> None:
        document = {"version": self.VERSION, "records": {name: list(info.__dict__.values()) for name, info in self.records.items()}}
        try:
            write_atomically(self.path(root), [json.dumps(document, separators=(",", ":")).encode()])
        except OSError:  # a read-only volume: the next scan just reads everything again
            pass

    def fold_journals(self, root: Path) -> list[Path]:
        """Add the writers' journal lines; returns the journals, to remove once the index is saved.

        Each journal is first renamed aside, so that lines appended meanwhile go to a
        new journal instead of being removed unread.
        """
        taken = []
        folder = root / INDEX
        for journal in sorted(folder.glob(f"{JOURNAL_PREFIX}*")) + _stale(folder.glob(f"{TEMP_PREFIX}{JOURNAL_PREFIX}*")):
            aside = journal.with_name(f"{TEMP_PREFIX}{journal.name}.{os.getpid()}.{time.time_ns()}")
            try:
                os.rename(journal, aside)
                text = aside.read_text(errors="replace")
            except OSError:  # another scan took it first, or a read-only volume
                continue
            taken.append(aside)
            for line in text.splitlines():
                try:
                    name, fields = json.loads(line)
                    self.records[name] = RecordInfo(*fields)
                except (ValueError, TypeError):  # a torn line: that record is read instead
                    continue
        return taken


def scan(root: Path, progress: Progress | None = None, full: bool = True, workers: int = WORKERS) -> Scan:
    """Every entry under `root`, newest first.

    `full` also lists payloads and locks: it finds the leftovers `gc` removes and
    payloads removed behind the cache's back; `ls` and `stats` do without.
    """
    records = root / RECORDS
    record_inodes, record_temporaries = _list(records)
    index = ListingIndex.load(root)
    journals = index.fold_journals(root)
    infos = {name: index.records[name] for name, inode in record_inodes.items() if name in index.records and index.records[name].inode == inode}
    unread = sorted(name for name in record_inodes if name not in infos)
    leftovers: list[Leftover] = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        done = 0
        for batch in pool.map(lambda chunk: [_read_record(root, name, record_inodes[name]) for name in chunk], _chunks(unread)):
            infos.update((info_name, info) for info_name, info in batch if info is not None)
            done += len(batch)
            if progress:
                progress(done, len(unread))
        if unread or journals or len(infos) != len(index.records):
            ListingIndex(infos).save(root)
            for journal in journals:
                _unlink(journal)
        if full:
            # Listed after the records: a listed record's payload, written before it, is
            # in this listing unless it was removed since.
            payload_inodes, payload_temporaries = _list(root / DATA)
            named = {info.payload for info in infos.values()}
            infos = {name: info if info.payload in payload_inodes else replace(info, payload_bytes=None) for name, info in infos.items()}
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


def _stale(paths: Iterable[Path]) -> list[Path]:
    """Journals set aside by a scan that died before removing them."""
    stale = []
    for path in paths:
        try:
            if time.time() - os.stat(path).st_mtime >= STALE_TEMPORARY_SECONDS:
                stale.append(path)
        except FileNotFoundError:
            continue
    return stale


def _chunks(names: Sequence[str]) -> Iterator[Sequence[str]]:
    """Batches keep the pool's per-task overhead small next to the I/O."""
    for start in range(0, len(names), _BATCH):
        yield names[start : start + _BATCH]


def _read_record(root: Path, key: str, inode: int) -> tuple[str, RecordInfo | None]:
    try:
        fd = os.open(root / RECORDS / key, os.O_RDONLY)
    except FileNotFoundError:  # removed since the listing
        return key, None
    try:
        raw = os.read(fd, MAX_RECORD_BYTES)
    finally:
        os.close(fd)
    return key, _describe_record(root, key, inode, raw)


def _describe_record(root: Path, key: str, inode: int, raw: bytes) -> RecordInfo:
    """What a scan keeps of a record file (`raw`, its whole content) and of its payload's size."""
    task = host = problem = code = None
    created = expires = seconds = None
    payload = key
    try:
        line, newline, body = raw.partition(b"\n")
        header = EntryHeader.from_line(line + newline)
        task, host, created, code, seconds = header.task, header.host, header.created, header.code, header.seconds
        if len(body) != header.size:
            raise EntryRefused(f"truncated record: {len(body)} of {header.size} bytes")
        metadata = json.loads(body)
        expires = _timestamp(metadata.get("expiration"))
        payload = Path(metadata.get("storage_key") or key).name
    except (EntryRefused, ValueError, TypeError, AttributeError) as exc:
        problem = f"damaged record: {exc}"
    try:
        payload_bytes: int | None = os.stat(root / DATA / payload).st_size
    except (FileNotFoundError, ValueError):
        payload_bytes = None
    return RecordInfo(inode, len(raw), task, host, created, expires, payload, payload_bytes, problem, code, seconds)


def note_record(root: Path, key: str, inode: int, raw: bytes) -> None:
    """Append a record just written (`raw`, its whole content) to this host's journal (see
    `ListingIndex`).

    Costs the writer one small append; any failure is ignored, since the journal only
    speeds up listing.
    """
    journal = root / INDEX / f"{JOURNAL_PREFIX}{socket.gethostname()}"
    try:
        info = _describe_record(root, key, inode, raw)
        line = json.dumps([key, list(info.__dict__.values())], separators=(",", ":")) + "\n"
        try:
            fd = os.open(journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except FileNotFoundError:
            makedirs_0755(journal.parent)
            fd = os.open(journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())  # one write: appends from one host's processes never interleave
        finally:
            os.close(fd)
    except OSError:
        pass


NOT_A_CACHE_KEY = "not a cache key (a failed or uncached run's result)"


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


def _timestamp(text: object) -> float | None:
    if text is None:
        return None
    if not isinstance(text, str):
        raise ValueError(f"expiration {text!r} is not a date")
    return datetime.fromisoformat(text).timestamp()


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


# --- removal --------------------------------------------------------------------------


NO_RECORD = 0  # no file has inode 0


class Outcome(Enum):
    REMOVED = "removed"
    BUSY = "busy"  # its lock is held: being computed or read right now
    CHANGED = "changed"  # rewritten since the scan: the reason to remove it may no longer hold
    MISSING = "missing"


@dataclass(frozen=True)
class Removal:
    """An entry `gc` chose, and why."""

    entry: Entry
    reason: str


@dataclass
class RemovalReport:
    removed: list[tuple[str, str, int]] = field(default_factory=list)  # key, reason, bytes
    skipped: list[tuple[str, str]] = field(default_factory=list)  # key, outcome
    leftovers_removed: int = 0
    leftover_bytes: int = 0

    @property
    def freed_bytes(self) -> int:
        return sum(size for _, _, size in self.removed) + self.leftover_bytes

    def as_dict(self) -> dict[str, object]:
        return {
            "removed": [{"key": key, "reason": reason, "size": size} for key, reason, size in self.removed],
            "skipped": [{"key": key, "why": why} for key, why in self.skipped],
            "leftovers_removed": self.leftovers_removed,
            "freed_bytes": self.freed_bytes,
        }


class Remover:
    """Removes entries under their key's lock, never waiting for it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._locks = FlockLockManager(lambda: root / LOCKS, lambda: 0.0)

    def remove(self, key: str, inode: int | None = None) -> Outcome:
        """Remove `key`'s record then payload.

        With `inode`, only if the record is still that file (`NO_RECORD`: only if there
        is none, for a payload left without its record).
        """
        lock_path = self._locks.lock_path(key)
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return Outcome.BUSY
            record = self.root / RECORDS / key
            if inode is not None and _inode(record) not in (inode, None):
                return Outcome.CHANGED
            removed = [_unlink(record), _unlink(self.root / DATA / key)]
            _unlink_lock(lock_path)
            return Outcome.REMOVED if any(removed) else Outcome.MISSING
        finally:
            os.close(fd)

    def remove_leftover(self, leftover: Leftover) -> bool:
        """Lone payloads and lock files only when their lock is free."""
        if leftover.kind in ("temporary", PARAMETERS):
            return _unlink(leftover.path)
        if leftover.kind == "lock":
            return self.remove_lock(leftover.path)
        return self.remove(leftover.path.name, NO_RECORD) in (Outcome.REMOVED, Outcome.MISSING)

    def remove_lock(self, lock_path: Path) -> bool:
        """A lock file (and its holder link) whose entry is gone, unless someone holds it."""
        try:
            fd = os.open(lock_path, os.O_RDONLY)
        except FileNotFoundError:
            return _unlink(holder_path(lock_path))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        try:
            return _unlink_lock(lock_path)
        finally:
            os.close(fd)


def removable_leftovers(found: Scan) -> list[Leftover]:
    """Every leftover but a temporary file still being written (touched within the hour) and
    parameters a task worker may still read (written within the week)."""
    keep_for = {"temporary": STALE_TEMPORARY_SECONDS, PARAMETERS: STALE_PARAMETERS_SECONDS}
    return [
        leftover for leftover in found.leftovers
        if leftover.kind not in keep_for or found.scanned_at - leftover.modified >= keep_for[leftover.kind]
    ]


def remove_all(
    remover: Remover,
    removals: Sequence[Removal],
    leftovers: Iterable[Leftover] = (),
    progress: Progress | None = None,
    workers: int = WORKERS,
) -> RemovalReport:
    """Remove the chosen entries (and leftovers) in parallel; report what happened to each."""
    report = RemovalReport()
    leftovers = list(leftovers)
    total = len(removals) + len(leftovers)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        done = 0
        for removal, outcome in zip(removals, pool.map(lambda r: remover.remove(r.entry.key, r.entry.inode), removals), strict=True):
            if outcome is Outcome.REMOVED:
                report.removed.append((removal.entry.key, removal.reason, removal.entry.size))
            elif outcome is not Outcome.MISSING:
                report.skipped.append((removal.entry.key, outcome.value))
            done += 1
            if progress and done % _BATCH == 0:
                progress(done, total)
        for leftover, removed in zip(leftovers, pool.map(remover.remove_leftover, leftovers), strict=True):
            if removed:
                report.leftovers_removed += 1
                report.leftover_bytes += leftover.size
    if progress:
        progress(total, total)
    return report


def plan_gc(
    found: Scan,
    expired: bool = False,
    older_than: float | None = None,
    max_size: int | None = None,
) -> list[Removal]:
    """Entries that can never be hits, then expired and old ones, then the oldest until under `max_size`."""
    now = found.scanned_at
    chosen: dict[str, Removal] = {}
    for entry in found.entries:
        if entry.problem:
            chosen[entry.key] = Removal(entry, entry.problem)
        elif expired and entry.is_expired(now):
            chosen[entry.key] = Removal(entry, "expired")
        elif older_than is not None and (entry.created or 0.0) < now - older_than:
            chosen[entry.key] = Removal(entry, "old")
    if max_size is not None:
        kept = [entry for entry in found.entries if entry.key not in chosen]
        size = sum(entry.size for entry in kept)
        for entry in sorted(kept, key=lambda e: e.created or 0.0):
            if size <= max_size:
                break
            chosen[entry.key] = Removal(entry, "over size")
            size -= entry.size
    return list(chosen.values())


def _inode(path: Path) -> int | None:
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None


def _unlink_lock(lock_path: Path) -> bool:
    """Called holding the lock: a run waiting on this file finds it gone once it gets the
    lock, and locks the file at that name instead (`locking._still_named`)."""
    _unlink(holder_path(lock_path))
    return _unlink(lock_path)


def _unlink(path: Path) -> bool:
    """False when it was already gone (another host's gc got there first)."""
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False
