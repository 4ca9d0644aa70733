"""Removing entries safely (`cache rm`, `clear`, `gc`), and which ones `gc` removes.

Prefect never deletes result files. An entry is removed only under its key's lock, taken
without waiting (the lock a run holds while it computes that key or looks for it on a
miss), so nothing being written is touched. A hit holds no lock: it has read and checked
both files before Prefect asks for them (see `locking`), so removing them meanwhile takes
nothing from it. The record goes first, then the payload, so a later reader never finds a
record whose payload is gone. A removed entry is simply a miss later. Which entries `gc`
removes is a pure function of a scan (`plan_gc`).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from juicecache.entryfile import DATA, LOCKS, PARAMETERS, RECORDS
from juicecache.listing import STALE_TEMPORARY_SECONDS
from juicecache.locking import FlockLockManager, holder_path, lock_file_if_free
from juicecache.scan import WORKERS, Entry, Leftover, Progress, Scan

# Background runs' parameters (`PARAMETERS`): a task worker reads them when it picks the run
# up, normally within seconds, but a run waits in the Prefect server's queue for as long as no
# worker serves its task; removed before, the run fails. Prefect itself never removes them:
# `gc` does once they are this old.
STALE_PARAMETERS_SECONDS = 7 * 24 * 3600.0
NO_RECORD = 0  # no file has inode 0
_PROGRESS_EVERY = 256  # removals


class Outcome(Enum):
    REMOVED = "removed"
    BUSY = "busy"  # its lock is held: being computed right now
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


def plan_gc(
    found: Scan,
    expired: bool = False,
    older_than: float | None = None,
    max_size: int | None = None,
) -> list[Removal]:
    """Entries that can never be hits, then expired and old ones, then the oldest until under `max_size`.

    Args:
        found: the scan to judge; its `scanned_at` is "now".
        expired: also the expired entries.
        older_than: also the entries created more than this many seconds ago.
        max_size: then the oldest of the rest, until the entries kept total at most this many bytes.
    """
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


def removable_leftovers(found: Scan) -> list[Leftover]:
    """Every leftover but a temporary file still being written (touched within the hour) and
    parameters a task worker may still read (written within the week)."""
    keep_for = {"temporary": STALE_TEMPORARY_SECONDS, PARAMETERS: STALE_PARAMETERS_SECONDS}
    return [
        leftover for leftover in found.leftovers
        if leftover.kind not in keep_for or found.scanned_at - leftover.modified >= keep_for[leftover.kind]
    ]


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
        # One holder per thread: the lock manager lets a holder take a key it holds again
        # without locking, and two threads removing one key must not both get it.
        holder = f"cache removal, thread {threading.get_ident()}"
        if not self._locks.acquire_lock(key, holder, acquire_timeout=0):
            return Outcome.BUSY
        try:
            record = self.root / RECORDS / key
            if inode is not None and _inode(record) not in (inode, None):
                return Outcome.CHANGED
            removed = [_unlink(record), _unlink(self.root / DATA / key)]
            _unlink_lock(self._locks.lock_path(key))
            return Outcome.REMOVED if any(removed) else Outcome.MISSING
        finally:
            self._locks.release_lock(key, holder)

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
            with lock_file_if_free(lock_path) as free:
                return free and _unlink_lock(lock_path)
        except FileNotFoundError:  # only its holder link is left
            return _unlink(holder_path(lock_path))


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
            if progress and done % _PROGRESS_EVERY == 0:
                progress(done, total)
        for leftover, removed in zip(leftovers, pool.map(remover.remove_leftover, leftovers), strict=True):
            if removed:
                report.leftovers_removed += 1
                report.leftover_bytes += leftover.size
    if progress:
        progress(total, total)
    return report


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
