"""A Prefect lock manager built on `flock` on the volume: correct across hosts, safe across crashes.

Why not Prefect's own managers: `FileSystemLockManager` is driven without a hold
timeout, so a killed holder blocks its key forever; it also creates the lock file empty
and fills it afterwards (a concurrent reader can crash on it), and keys with dots can
collide on the lock file name. Redis locks (`prefect-redis`) need a setting of their own
and still leave a killed holder's lock until it expires.

JuiceFS implements BSD `flock` locks across all its clients, through the metadata
engine, and drops a lock as soon as the holding process dies. On a local folder the
kernel gives the same guarantee between processes. So the lock needs no extra setting,
no expiry and no clean-up, and a waiter's wait is bounded by `acquire_timeout`.
The lock file's text (who holds it) is only ever shown to people, never trusted.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from anyio import to_thread

from juicecache.entryfile import make_folders

_SAFE_KEY = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
_FIRST_POLL, _MAX_POLL = 0.01, 0.25
# Writing the holder's name into the lock file is a data write, which JuiceFS turns into an
# object upload when the file is closed: one S3 PUT per cache hit (a hit holds the lock for
# milliseconds), the largest part of a hit's time with a distant S3 in the benchmark. Only a
# holder that keeps the lock this long, the one a waiter may need named, writes it.
_NAME_HOLDER_AFTER = 0.5


class LockTimeout(TimeoutError):
    """A waiter gave up; the message names the key, the wait and the holder."""


@dataclass
class _Held:
    fd: int
    holder: str
    naming: threading.Timer | None = None


class FlockLockManager:
    """Implements Prefect's `LockManager` protocol with one `flock`ed file per cache key."""

    def __init__(self, folder: Callable[[], Path], acquire_timeout: Callable[[], float]) -> None:
        self._folder = folder
        self._acquire_timeout = acquire_timeout
        self._held: dict[str, _Held] = {}
        self._guard = threading.Lock()

    def lock_path(self, key: str) -> Path:
        """Keys that are not plain names are hashed, so no two keys share a lock file."""
        name = key if _SAFE_KEY.match(key) else hashlib.sha256(key.encode()).hexdigest()
        return self._folder() / f"{name}.lock"

    def acquire_lock(
        self,
        key: str,
        holder: str,
        acquire_timeout: float | None = None,
        hold_timeout: float | None = None,
    ) -> bool:
        """Block until the lock is ours. `hold_timeout` is not needed: a dead holder's lock is gone."""
        with self._guard:
            held = self._held.get(key)
            if held is not None and held.holder == holder:
                return True
        timeout = self._acquire_timeout() if acquire_timeout is None else acquire_timeout
        path = self.lock_path(key)
        make_folders(path.parent)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if not _flock_within(fd, fcntl.LOCK_EX, timeout):
                raise LockTimeout(
                    f"gave up after {timeout:g} s waiting for the lock on cache key {key} "
                    f"(held by {_describe_holder(path)}); raise JUICECACHE_LOCK_TIMEOUT to wait longer"
                )
        except BaseException:
            os.close(fd)
            raise
        held = _Held(fd, holder)
        held.naming = threading.Timer(_NAME_HOLDER_AFTER, self._name_holder, (key, held, time.time()))
        held.naming.daemon = True
        with self._guard:
            self._held[key] = held
        held.naming.start()
        return True

    def _name_holder(self, key: str, held: _Held, since: float) -> None:
        """Say who holds the lock, in the lock file, for a waiter's message (only ever shown to people)."""
        with self._guard:  # release_lock closes the descriptor under the same guard
            if self._held.get(key) is not held:
                return
            try:
                os.ftruncate(held.fd, 0)
                os.pwrite(held.fd, f"{held.holder} host={socket.gethostname()} pid={os.getpid()} since={since:.0f}\n".encode(), 0)
            except OSError:
                pass

    async def aacquire_lock(
        self,
        key: str,
        holder: str,
        acquire_timeout: float | None = None,
        hold_timeout: float | None = None,
    ) -> bool:
        return await to_thread.run_sync(self.acquire_lock, key, holder, acquire_timeout, hold_timeout)

    def release_lock(self, key: str, holder: str) -> None:
        with self._guard:
            held = self._held.get(key)
            if held is None or held.holder != holder:
                raise ValueError(f"cannot release the lock on {key}: {holder} does not hold it")
            del self._held[key]
            if held.naming is not None:
                held.naming.cancel()
        # Closing the descriptor releases the flock; the file stays for the next holder.
        os.close(held.fd)

    def is_locked(self, key: str) -> bool:
        with self._guard:
            if key in self._held:
                return True
        try:
            fd = os.open(self.lock_path(key), os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)

    def is_lock_holder(self, key: str, holder: str) -> bool:
        with self._guard:
            held = self._held.get(key)
            return held is not None and held.holder == holder

    def wait_for_lock(self, key: str, timeout: float | None = None) -> bool:
        """True once nobody holds the lock, False if that did not happen within the timeout."""
        try:
            fd = os.open(self.lock_path(key), os.O_RDONLY)
        except FileNotFoundError:
            return True
        try:
            return _flock_within(fd, fcntl.LOCK_SH, self._acquire_timeout() if timeout is None else timeout)
        finally:
            os.close(fd)

    async def await_for_lock(self, key: str, timeout: float | None = None) -> bool:
        return await to_thread.run_sync(self.wait_for_lock, key, timeout)


def _flock_within(fd: int, operation: int, timeout: float) -> bool:
    """Poll a non-blocking flock: a blocking one could not be given up on, or interrupted."""
    deadline = time.monotonic() + timeout
    delay = _FIRST_POLL
    while True:
        try:
            fcntl.flock(fd, operation | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, _MAX_POLL)


def _describe_holder(path: Path) -> str:
    try:
        text = path.read_text(errors="replace").strip()
    except OSError:
        text = ""
    return text or "another process"
