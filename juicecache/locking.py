"""A Prefect lock manager built on `flock` on the volume: correct across hosts, safe across crashes.

Why not Prefect's own managers: `FileSystemLockManager` is driven without a hold
timeout, so a killed holder blocks its key forever; it also creates the lock file empty
and fills it afterwards (a concurrent reader can crash on it), and keys with dots can
collide on the lock file name. Redis locks (`prefect-redis`) need a setting of their own
and still leave a killed holder's lock until it expires.

JuiceFS implements BSD `flock` locks across all its clients, through the metadata
engine, and drops a lock as soon as the holding process dies. On a local folder the
kernel gives the same guarantee between processes. So the lock needs no extra setting
and no expiry, and a waiter's wait is bounded by `acquire_timeout`. `cache gc` removes
the lock files of the entries it removes (see `_still_named`). Two cases need care: a
lock released while the metadata engine is unreachable (retried, see `_release`), and
the locks of a JuiceFS client that died, which JuiceFS keeps until that client's session
expires (5 heartbeats: 60 s by default).

Who holds a lock is recorded beside it, as the target of a symlink `KEY.lock.holder`,
not written into the lock file: a file's content costs JuiceFS an object upload (and the
lock would then hang while the object store is down), whereas a symlink lives in the
metadata engine alone. Only a holder that keeps the lock for `NAME_HOLDER_AFTER` (a run
computing, the one a waiter may need named) records itself. The record is only ever shown
to people, never trusted.

A hit takes no lock at all. The lock exists so that a key is computed once, and an entry
never changes once it has its name (it is only ever replaced by a rename), so a run whose
entry is already committed and checked has nothing to wait for: the manager asks
`committed(key)` first (the store checks the entry and keeps it for the reads that follow)
and holds the key without `flock`. Only a miss locks: it takes the lock, and Prefect then
looks for the entry again, under it, before computing.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import re
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from anyio import to_thread

from juicecache.entryfile import TEMP_PREFIX, makedirs_0755

_SAFE_KEY = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
# Waiters poll (see `_flock_within`). After a computation, every waiter takes the lock in
# turn for its own hit (tens of ms on JuiceFS); a waiter polling every 0.25 s kept missing
# those short windows, and 8 runs of one 3 s key took 4.6 s instead of 3.3 (`make bench`).
# A denied poll costs one metadata transaction: 20 a second per waiter.
_FIRST_POLL, _MAX_POLL = 0.01, 0.05
# How long releasing a lock keeps retrying while the metadata engine does not answer (see `_release`).
RELEASE_PATIENCE = 60.0
# A holder names itself once it has held the lock this long (see the module docstring):
# recording it costs two metadata writes, a third of a hit's time with a distant engine.
NAME_HOLDER_AFTER = 0.5
# How many released (key, holder) pairs are remembered, so a release repeated by the same
# holder is a no-op (see `release_lock`).
_REMEMBERED_RELEASES = 1024
logger = logging.getLogger("juicecache")


class LockTimeout(TimeoutError):
    """A waiter gave up; the message names the key, the wait and the holder."""


@dataclass
class _Held:
    fd: int | None  # None: a hit's or a read-only consumer's hold, which locks nothing
    holder: str
    naming: threading.Timer | None


class FlockLockManager:
    """Implements Prefect's `LockManager` protocol with one `flock`ed file per cache key.

    Args:
        folder: where the lock files are, asked on each use (the store resolves it lazily).
        acquire_timeout: how long `acquire_lock` waits when not told, asked on each use.
        read_only: asked on each acquire; when true, nothing is locked or written (a
            read-only consumer computes a miss itself and stores nothing, so it needs no lock).
        committed: asked first on each acquire: is the key's entry there and sound, so that
            this run is a hit and needs no lock (see the module docstring)?

    It pickles as its callables: the copy a Dask worker or a subprocess unpickles starts
    with no lock held, and resolves its folder there.
    """

    def __init__(
        self,
        folder: Callable[[], Path],
        acquire_timeout: Callable[[], float],
        read_only: Callable[[], bool] = bool,
        committed: Callable[[str], bool] | None = None,
    ) -> None:
        self._folder = folder
        self._acquire_timeout = acquire_timeout
        self._read_only = read_only
        self._committed = committed
        self._held: dict[str, _Held] = {}
        self._released: collections.OrderedDict[tuple[str, str], None] = collections.OrderedDict()
        self._guard = threading.Lock()

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self._folder, self._acquire_timeout, self._read_only, self._committed))

    def lock_path(self, key: str) -> Path:
        return self._folder() / lock_file_name(key)

    def acquire_lock(
        self,
        key: str,
        holder: str,
        acquire_timeout: float | None = None,
        hold_timeout: float | None = None,
    ) -> bool:
        """Wait until the lock is ours. `hold_timeout` is not needed: a dead holder's lock is gone.

        Given an `acquire_timeout`, returns False when it runs out, as Prefect's protocol
        says. Without one (how Prefect's transactions call it, ignoring the result) it waits
        `JUICECACHE_LOCK_TIMEOUT`, then raises `LockTimeout`, whose one line names the key,
        the holder and the setting. A key whose entry is `committed` is held without a lock.
        """
        with self._guard:
            held = self._held.get(key)
            if held is not None and held.holder == holder:
                return True
        if (self._committed is not None and self._committed(key)) or self._read_only():
            with self._guard:
                self._held[key] = _Held(None, holder, None)
            return True
        timeout = self._acquire_timeout() if acquire_timeout is None else acquire_timeout
        deadline = time.monotonic() + timeout
        path = self.lock_path(key)
        while True:
            fd = _open_lock_file(path)
            try:
                acquired = _flock_within(fd, max(0.0, deadline - time.monotonic()))
                if acquired and _still_named(fd, path):
                    break
            except BaseException:
                _release(fd, path)  # also when flock failed: it may have been granted all the same
                raise
            # Given up, or `cache gc` removed the file while we waited on it (then lock the one there now).
            _release(fd, path)
            if not acquired and acquire_timeout is not None:
                return False
            if not acquired:
                raise LockTimeout(
                    f"gave up after {timeout:g} s waiting for the lock on cache key {key} "
                    f"(held by {_describe_holder(path)}); raise JUICECACHE_LOCK_TIMEOUT to wait longer"
                )
        text = f"{holder} host={socket.gethostname()} pid={os.getpid()} since={time.time():.0f}"
        naming = threading.Timer(NAME_HOLDER_AFTER, _record_holder, (path, text))
        naming.daemon = True
        with self._guard:
            self._held[key] = _Held(fd, holder, naming)
        naming.start()
        return True

    async def aacquire_lock(
        self,
        key: str,
        holder: str,
        acquire_timeout: float | None = None,
        hold_timeout: float | None = None,
    ) -> bool:
        return await to_thread.run_sync(self.acquire_lock, key, holder, acquire_timeout, hold_timeout)

    def release_lock(self, key: str, holder: str) -> None:
        """Release `holder`'s lock. Releasing it again is a no-op: a cached task's transaction
        commits when the task ends (see `transactions`), and its parent, committing later,
        releases the child's lock once more. Any other holder is refused, as Prefect's do."""
        with self._guard:
            held = self._held.get(key)
            if (held is None or held.holder != holder) and (key, holder) in self._released:
                return
            if held is None or held.holder != holder:
                raise ValueError(f"No lock held by {holder} for transaction with key {key}")
            del self._held[key]
            self._released[(key, holder)] = None
            while len(self._released) > _REMEMBERED_RELEASES:
                self._released.popitem(last=False)
        if held.fd is not None:
            held.naming.cancel()
            _release(held.fd, self.lock_path(key))  # the file stays for the next holder

    def is_locked(self, key: str) -> bool:
        """Probed with an exclusive lock that is let go at once, never a shared one: JuiceFS
        1.4 keeps a dead client's *shared* flock locks (fixed upstream after 1.4.2), so a
        client dying while it probed could otherwise lock the key for good."""
        with self._guard:
            if key in self._held:
                return True
        return not self._read_only() and not self.wait_for_lock(key, timeout=0)

    def is_lock_holder(self, key: str, holder: str) -> bool:
        with self._guard:
            held = self._held.get(key)
            return held is not None and held.holder == holder

    def wait_for_lock(self, key: str, timeout: float | None = None) -> bool:
        """True once nobody holds the lock, False if that did not happen within the timeout
        (default: JUICECACHE_LOCK_TIMEOUT). Probes exclusively, as `is_locked` does."""
        path = self.lock_path(key)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return True
        try:
            return _flock_within(fd, self._acquire_timeout() if timeout is None else timeout)
        finally:
            _release(fd, path)

    async def await_for_lock(self, key: str, timeout: float | None = None) -> bool:
        return await to_thread.run_sync(self.wait_for_lock, key, timeout)


def lock_file_name(key: str) -> str:
    """Keys that are not plain names are hashed, so no two keys share a lock file."""
    name = key if _SAFE_KEY.match(key) else hashlib.sha256(key.encode()).hexdigest()
    return f"{name}.lock"


def _open_lock_file(path: Path) -> int:
    """Open (creating) a lock file, which is never written: see the module docstring. Its
    folder is made only when missing, which costs one round trip once, not on every run."""
    try:
        return os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)
    except FileNotFoundError:
        makedirs_0755(path.parent)
        return os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)


def _still_named(fd: int, path: Path) -> bool:
    """Is the file locked through `fd` still the one at `path`? `cache gc` removes the lock
    files of removed entries, under their lock; a run that opened one just before waits on
    a file nobody else sees any more, and must not count that as holding the key."""
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _release(fd: int, path: Path) -> None:
    """Unlock, then close. Closing alone would release the lock too, but JuiceFS reports no
    error from it: a release lost while the metadata engine is unreachable leaves the lock
    held for as long as this client stays mounted, and every later run for the key waits.
    An explicit unlock says when it failed, so it is retried until the engine answers."""
    deadline = time.monotonic() + RELEASE_PATIENCE
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
            break
        except OSError as exc:
            if exc.errno in (errno.ENOTCONN, errno.ECONNABORTED):
                break  # a dead client: its locks go with its session
            if time.monotonic() >= deadline:
                logger.warning(
                    "could not release the lock %s (%s): runs for its key wait until the volume is remounted",
                    path.name, exc.strerror,
                )
                break
            time.sleep(0.5)
    os.close(fd)


def _flock_within(fd: int, timeout: float) -> bool:
    """Poll a non-blocking exclusive flock: a blocking one could not be given up on, or interrupted."""
    deadline = time.monotonic() + timeout
    delay = _FIRST_POLL
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, _MAX_POLL)


@contextlib.contextmanager
def lock_file_if_free(path: Path) -> Iterator[bool]:
    """Lock the existing lock file `path` for the `with` body if nobody holds it, never
    waiting; yields whether it did. For `cache gc`, which finds lock files whose key it
    cannot name (a key's lock file name may be its hash). Raises FileNotFoundError when
    there is no file at `path`."""
    fd = os.open(path, os.O_RDONLY)
    try:
        yield _flock_within(fd, 0) and _still_named(fd, path)
    finally:
        _release(fd, path)


def holder_path(lock: Path) -> Path:
    return lock.with_name(f"{lock.name}.holder")


def _record_holder(lock: Path, text: str) -> None:
    """Point `KEY.lock.holder` at `text`, atomically (a temporary symlink renamed over it).

    Runs on a timer thread, so it may land just after the lock was released: the record
    is then out of date, which is harmless for something only ever shown to people.
    """
    temp = lock.with_name(f"{TEMP_PREFIX}{lock.name}.{os.getpid()}.{secrets.token_hex(4)}")
    try:
        os.symlink(text, temp)
        os.replace(temp, holder_path(lock))
    except OSError:  # the volume failing meanwhile: the run itself reports it, not this thread
        with contextlib.suppress(OSError):
            temp.unlink(missing_ok=True)


def _describe_holder(lock: Path) -> str:
    try:
        text = os.readlink(holder_path(lock)).strip()
    except OSError:
        text = ""
    return text or "another process"
