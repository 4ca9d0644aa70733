"""Everything a cached task holds survives pickle and cloudpickle, and comes back fresh:
the default store as a reference, the lock manager with no lock held."""

from __future__ import annotations

import pickle
from pathlib import Path

import cloudpickle
import pytest

from juicecache.cache import cached_task
from juicecache.locking import FlockLockManager
from juicecache.store import DEFAULT_STORE, Store


@cached_task
def double(x: int) -> int:
    return 2 * x


@pytest.mark.parametrize("dumps", [pickle.dumps, cloudpickle.dumps], ids=["pickle", "cloudpickle"])
def test_the_policy_its_lock_manager_and_storage_pickle(dumps) -> None:
    policy = pickle.loads(dumps(double.cache_policy))
    assert isinstance(policy.lock_manager, FlockLockManager)
    assert policy.key_storage.kind == "records"
    assert pickle.loads(dumps(double.result_storage)).kind == "data"
    # The store arrives as this process's default store, resolved here.
    assert policy.cache_key_fn.store is DEFAULT_STORE
    assert policy.cache_key_fn(None, {"x": 3}) == double.cache_policy.cache_key_fn(None, {"x": 3})


def test_the_task_cloudpickles_with_its_key() -> None:
    task = cloudpickle.loads(cloudpickle.dumps(double))
    assert task.cache_policy.cache_key_fn.identity == double.cache_policy.cache_key_fn.identity
    assert task.fn(4) == 8


def test_a_lock_manager_unpickles_holding_nothing(tmp_path: Path) -> None:
    manager = FlockLockManager(lambda: tmp_path, lambda: 1.0)
    manager.acquire_lock("key", "holder")
    try:
        copy = cloudpickle.loads(cloudpickle.dumps(manager))
        assert not copy.is_lock_holder("key", "holder")
        assert copy.is_locked("key")  # the lock itself is the file's, seen from anywhere
    finally:
        manager.release_lock("key", "holder")


def test_a_store_with_explicit_settings_carries_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JUICECACHE_ENV_FILE", str(tmp_path / "none.env"))
    (tmp_path / "none.env").write_text("")
    from juicecache.settings import load_settings

    store = Store(load_settings(tmp_path))
    copy = pickle.loads(pickle.dumps(store))
    assert copy is not store and copy._settings == store._settings
    assert pickle.loads(pickle.dumps(DEFAULT_STORE)) is DEFAULT_STORE
