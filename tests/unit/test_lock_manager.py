"""`FlockLockManager` on a temporary folder: exclusion, release rules, nested commits."""

from __future__ import annotations

from pathlib import Path

import pytest

from juicecache.locking import FlockLockManager, LockTimeout, lock_file_name


def test_a_second_holder_waits_and_gives_up(tmp_path: Path) -> None:
    manager = FlockLockManager(lambda: tmp_path, lambda: 0.2)
    assert manager.acquire_lock("key", "first")
    with pytest.raises(LockTimeout, match="gave up after 0.2 s"):
        manager.acquire_lock("key", "second")
    manager.release_lock("key", "first")
    assert manager.acquire_lock("key", "second")
    manager.release_lock("key", "second")


def test_the_same_holder_reenters(tmp_path: Path) -> None:
    manager = FlockLockManager(lambda: tmp_path, lambda: 0.2)
    assert manager.acquire_lock("key", "holder") and manager.acquire_lock("key", "holder")
    assert manager.is_lock_holder("key", "holder") and manager.is_locked("key")
    manager.release_lock("key", "holder")
    assert not manager.is_locked("key")


def test_a_repeated_release_by_the_same_holder_is_a_no_op(tmp_path: Path) -> None:
    """A cached task commits when it ends; its parent's commit releases its lock once more."""
    manager = FlockLockManager(lambda: tmp_path, lambda: 0.2)
    manager.acquire_lock("key", "child")
    manager.release_lock("key", "child")
    manager.release_lock("key", "child")
    with pytest.raises(ValueError, match="No lock held by stranger"):
        manager.release_lock("key", "stranger")


def test_lock_file_names_never_collide() -> None:
    assert lock_file_name("compute-abc") == "compute-abc.lock"
    assert lock_file_name("a.b") != lock_file_name("a_b")
    assert lock_file_name("../escape").endswith(".lock") and "/" not in lock_file_name("../escape")
