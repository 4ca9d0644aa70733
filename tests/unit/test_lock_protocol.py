"""`FlockLockManager` against the docstrings of Prefect's `LockManager` protocol, on a
temporary folder (the same file locks JuiceFS gives across hosts; tests/test_locking.py
and the multi-host tests run them on real volumes)."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest
from prefect.locking.protocol import LockManager

from juicecache.locking import FlockLockManager, LockTimeout


@pytest.fixture
def manager(tmp_path: Path) -> FlockLockManager:
    return FlockLockManager(lambda: tmp_path, lambda: 0.3)


def test_it_is_a_prefect_lock_manager(manager: FlockLockManager) -> None:
    assert isinstance(manager, LockManager)


def test_acquire_returns_true_once_acquired(manager: FlockLockManager) -> None:
    assert manager.acquire_lock("key", "holder") is True
    assert manager.is_locked("key") and manager.is_lock_holder("key", "holder")


def test_an_acquire_timeout_of_zero_tries_once_and_returns_false(manager: FlockLockManager) -> None:
    manager.acquire_lock("key", "holder")
    started = time.monotonic()
    assert manager.acquire_lock("key", "other", acquire_timeout=0) is False
    assert time.monotonic() - started < 0.25  # no waiting (the manager's own limit is 0.3 s)
    assert not manager.is_lock_holder("key", "other")


def test_an_explicit_acquire_timeout_returns_false_when_it_runs_out(manager: FlockLockManager) -> None:
    manager.acquire_lock("key", "holder")
    started = time.monotonic()
    assert manager.acquire_lock("key", "other", acquire_timeout=0.5) is False
    assert time.monotonic() - started >= 0.5


def test_without_a_timeout_it_raises_one_line_naming_the_setting(manager: FlockLockManager) -> None:
    """Prefect's transactions ignore the returned value: a silent False would let two runs compute."""
    manager.acquire_lock("key", "holder")
    with pytest.raises(LockTimeout, match="JUICECACHE_LOCK_TIMEOUT"):
        manager.acquire_lock("key", "other")


def test_a_waiter_gets_the_lock_when_it_is_released(manager: FlockLockManager) -> None:
    manager.acquire_lock("key", "holder")
    got: list[bool] = []
    waiter = threading.Thread(target=lambda: got.append(manager.acquire_lock("key", "waiter", acquire_timeout=10)))
    waiter.start()
    time.sleep(0.2)
    manager.release_lock("key", "holder")
    waiter.join(10)
    assert got == [True] and manager.is_lock_holder("key", "waiter")


def test_release_requires_the_holder_that_acquired(manager: FlockLockManager) -> None:
    manager.acquire_lock("key", "holder")
    with pytest.raises(ValueError, match="No lock held by other for transaction with key key"):
        manager.release_lock("key", "other")
    assert manager.is_lock_holder("key", "holder")
    manager.release_lock("key", "holder")
    assert not manager.is_locked("key")
    with pytest.raises(ValueError, match="No lock held by never for transaction with key unknown"):
        manager.release_lock("unknown", "never")


def test_is_locked_sees_a_lock_held_by_another_manager(tmp_path: Path) -> None:
    first, second = FlockLockManager(lambda: tmp_path, lambda: 0.3), FlockLockManager(lambda: tmp_path, lambda: 0.3)
    assert not second.is_locked("key")
    first.acquire_lock("key", "holder")
    assert second.is_locked("key") and not second.is_lock_holder("key", "holder")
    first.release_lock("key", "holder")
    assert not second.is_locked("key")


def test_wait_for_lock_is_true_once_free_and_false_on_timeout(manager: FlockLockManager) -> None:
    assert manager.wait_for_lock("never-locked", timeout=0)
    manager.acquire_lock("key", "holder")
    assert manager.wait_for_lock("key", timeout=0.2) is False
    threading.Timer(0.2, manager.release_lock, ("key", "holder")).start()
    assert manager.wait_for_lock("key", timeout=5) is True


def test_the_async_calls_behave_like_the_sync_ones(manager: FlockLockManager) -> None:
    async def scenario() -> tuple[bool, bool, bool]:
        acquired = await manager.aacquire_lock("key", "holder")
        refused = await manager.aacquire_lock("key", "other", acquire_timeout=0)
        waited = await manager.await_for_lock("key", timeout=0.1)
        manager.release_lock("key", "holder")
        return acquired, refused, waited

    assert asyncio.run(scenario()) == (True, False, False)
    assert not manager.is_locked("key")
