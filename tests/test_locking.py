"""The key lock when `cache gc` removes its file: whoever waited on the old file must not hold the key."""

from __future__ import annotations

import fcntl
import os
import threading
import time

from juicecache.locking import FlockLockManager
from juicecache.removal import Remover
from tests.support.environment import Sandbox
from tests.support.processes import wait_until


def test_a_waiter_on_a_removed_lock_file_locks_the_new_one(mounted: Sandbox) -> None:
    locks = mounted.mount_point / "prefect-cache" / "locks"
    key = "compute-0123456789abcdef"
    path = locks / f"{key}.lock"
    locks.mkdir(parents=True, exist_ok=True)
    gc = os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)
    fcntl.flock(gc, fcntl.LOCK_EX)  # `cache gc` holds the lock of an entry it is removing

    acquired = threading.Event()
    waiter = FlockLockManager(lambda: locks, lambda: 60.0)
    thread = threading.Thread(target=lambda: (waiter.acquire_lock(key, "waiter"), acquired.set()), daemon=True)
    thread.start()
    time.sleep(0.5)  # the waiter has opened the file and polls it
    assert not acquired.is_set()

    os.unlink(path)  # gc removes the lock file, still holding the lock ...
    newcomer = FlockLockManager(lambda: locks, lambda: 1.0)
    os.close(gc)  # ... and lets go; a newcomer takes the key through the new file
    try:
        newcomer.acquire_lock(key, "newcomer")
    except TimeoutError:
        pass  # the waiter got in first, through the new file: also correct
    else:
        time.sleep(1.0)
        assert not acquired.is_set(), "the waiter took the key while the newcomer held it"
        newcomer.release_lock(key, "newcomer")
    assert wait_until(acquired.is_set, 10)
    assert os.stat(path).st_ino == os.fstat(waiter._held[key].fd).st_ino
    waiter.release_lock(key, "waiter")


def test_gc_removes_a_lock_file_only_when_nobody_holds_it(mounted: Sandbox) -> None:
    locks = mounted.mount_point / "prefect-cache" / "locks"
    manager = FlockLockManager(lambda: locks, lambda: 5.0)
    manager.acquire_lock("held-key", "run")
    remover = Remover(mounted.mount_point / "prefect-cache")
    assert not remover.remove_lock(manager.lock_path("held-key"))
    assert manager.lock_path("held-key").exists()
    manager.release_lock("held-key", "run")
    assert remover.remove_lock(manager.lock_path("held-key"))
    assert not list(locks.iterdir())  # the holder link went with it
