"""The cache: keys, Prefect's cache policy wired to the volume, and the `cached_task` decorator.

Prefect decides a hit by finding an unexpired result record under the policy's key
storage; this module only points that machinery at the volume and adds what Prefect
lacks for a shared volume: atomic checked entries (`storage`), a crash-safe cross-host
lock (`locking`), keys that are stable across machines, and one warning when an entry
is refused.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar, overload

from prefect import Task, task
from prefect.cache_policies import CacheKeyFnPolicy
from prefect.context import TaskRunContext
from prefect.utilities.hashing import hash_objects

from juicecache.locking import FlockLockManager
from juicecache.settings import Settings, load_settings, parse_duration
from juicecache.storage import DATA, LOCKS, RECORDS, EntryStorage, Signer, StoreConfig
from juicecache.volume import CacheLocation, cache_location

logger = logging.getLogger("juicecache")

R = TypeVar("R")
KeyFn = Callable[[TaskRunContext, dict[str, Any]], str | None]
_SAFE = re.compile(r"^[A-Za-z0-9_-]{1,100}$")


class UnhashableInput(TypeError):
    """An argument cannot be turned into a stable cache key."""


@dataclass
class ActiveCache:
    """Where and how this process caches: resolved once, on first use."""

    settings: Settings
    location: CacheLocation
    signer: Signer
    refused: list[tuple[Path, str]] = field(default_factory=list)

    def store_config(self) -> StoreConfig:
        return StoreConfig(self.location.path, self.signer, self.note_refused)

    def note_refused(self, path: Path, reason: str) -> None:
        """One warning per refused file and run, however often Prefect looks at it."""
        if any(seen == path for seen, _ in self.refused):
            return
        self.refused.append((path, reason))
        logger.warning("cache entry %s/%s refused (%s); recomputing it", path.parent.name, path.name, reason)


_active: ActiveCache | None = None
_activation = threading.Lock()


def activate(settings: Settings | None = None) -> ActiveCache:
    """Resolve settings and the volume for this process (once); warn once if falling back."""
    global _active
    with _activation:
        if _active is None or settings is not None:
            settings = settings or load_settings()
            location = cache_location(settings)
            if location.warning:
                logger.warning(location.warning)
            _active = ActiveCache(settings, location, Signer(settings.signing_key.encode()))
        return _active


def active() -> ActiveCache:
    return _active or activate()


def _store_config() -> StoreConfig:
    return active().store_config()


def _locks_folder() -> Path:
    return active().location.path / LOCKS


def _lock_timeout() -> float:
    return active().settings.lock_timeout


LOCK_MANAGER = FlockLockManager(_locks_folder, _lock_timeout)


def stable_hash(*values: Any) -> str:
    """SHA-256 of the values' JSON form (Prefect's hashing): the same on every machine."""
    digest = hash_objects(*values, hash_algo=hashlib.sha256, raise_on_failure=True)
    assert digest is not None
    return digest


def hash_inputs(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    """The default key: every argument of the call, by name."""
    try:
        return stable_hash(parameters)
    except Exception:
        for name, value in parameters.items():
            try:
                stable_hash(value)
            except Exception:
                raise UnhashableInput(
                    f"argument {name!r} of task {context.task.name!r} ({type(value).__name__}) cannot be "
                    "hashed into a cache key: pass cache_key_fn=..., or exclude it from the key"
                ) from None
        raise


def task_identity(fn: Callable[..., Any]) -> str:
    return f"{fn.__module__}.{fn.__qualname__}"


def namespaced_key(fn: Callable[..., Any], key_fn: KeyFn) -> KeyFn:
    """Prefix keys with the task's name and hash them with its identity.

    Two tasks called with the same inputs then never share an entry, and any key the
    user returns becomes a safe file name.
    """
    identity = task_identity(fn)
    prefix = re.sub(r"[^a-z0-9]+", "-", fn.__name__.lower()).strip("-")[:40] or "task"

    def key(context: TaskRunContext, parameters: dict[str, Any]) -> str | None:
        user_key = key_fn(context, parameters)
        if user_key is None:
            return None
        digest = hashlib.sha256(f"{identity}\n{user_key}".encode()).hexdigest()
        return f"{prefix}-{digest[:40]}"

    return key


def cache_policy(key_fn: KeyFn) -> CacheKeyFnPolicy:
    """Prefect's own key-function policy, serialized by our lock, keys stored on the volume.

    `cache_key_fn=` and `cache_policy=` cannot be given to Prefect together (the policy is
    silently dropped), so the key function lives inside the policy.
    """
    return CacheKeyFnPolicy(cache_key_fn=key_fn).configure(
        key_storage=EntryStorage.create(RECORDS, _store_config),
        lock_manager=LOCK_MANAGER,
        isolation_level="SERIALIZABLE",
    )


def as_timedelta(expire: str | timedelta | None) -> timedelta | None:
    if expire is None or isinstance(expire, timedelta):
        return expire
    return parse_duration(expire)


@overload
def cached_task(fn: Callable[..., R], /) -> Task[..., R]: ...
@overload
def cached_task(
    *, cache_key_fn: KeyFn | None = None, expire: str | timedelta | None = None, refresh: bool = False, **task_options: Any
) -> Callable[[Callable[..., R]], Task[..., R]]: ...


def cached_task(
    fn: Callable[..., R] | None = None,
    /,
    *,
    cache_key_fn: KeyFn | None = None,
    expire: str | timedelta | None = None,
    refresh: bool = False,
    **task_options: Any,
) -> Task[..., R] | Callable[[Callable[..., R]], Task[..., R]]:
    """Like `prefect.task`, with the shared juicecache cache.

    The key is the hash of every argument (or `cache_key_fn`'s value), namespaced by
    the task; results live on the mounted JuiceFS volume (or the local fallback, with
    one warning); a cross-host lock makes concurrent calls with a new key compute once;
    `expire` ("30s", "1h" or a timedelta) bounds an entry's life; `refresh` recomputes
    and overwrites. Any other Prefect task option is passed through.
    """

    def decorate(function: Callable[..., R]) -> Task[..., R]:
        return task(
            function,
            cache_policy=cache_policy(namespaced_key(function, cache_key_fn or hash_inputs)),
            result_storage=EntryStorage.create(DATA, _store_config),
            persist_result=True,
            cache_expiration=as_timedelta(expire),
            refresh_cache=refresh or None,
            **task_options,
        )

    return decorate(fn) if fn is not None else decorate
