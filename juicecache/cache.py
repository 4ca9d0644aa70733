"""The cache: keys, Prefect's cache policy wired to the volume, and the `cached_task` decorator.

Prefect decides a hit by finding an unexpired result record under the policy's key
storage; this module only points that machinery at the volume and adds what Prefect
lacks for a shared volume: atomic checked entries (`storage`), a crash-safe cross-host
lock (`locking`), keys that are stable across machines, and one warning when an entry
is refused.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import logging
import re
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, ParamSpec, TypeVar, overload
from uuid import UUID

from prefect import Task, task
from prefect.cache_policies import CacheKeyFnPolicy
from prefect.context import TaskRunContext
from prefect.utilities.hashing import hash_objects

from juicecache.entryfile import KEY_DIGEST_CHARS, KEY_PREFIX_CHARS
from juicecache.locking import FlockLockManager
from juicecache.serializer import RawPickleSerializer
from juicecache.settings import Settings, load_settings, parse_duration
from juicecache.storage import DATA, LOCKS, RECORDS, EntryStorage, Signer, StoreConfig
from juicecache.volume import CacheLocation, cache_location

logger = logging.getLogger("juicecache")

P = ParamSpec("P")
R = TypeVar("R")
KeyFn = Callable[[TaskRunContext, dict[str, Any]], str | None]


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


def activated() -> ActiveCache | None:
    """The cache this process resolved, if it did yet (never resolves it)."""
    return _active


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


def hash_inputs(context: TaskRunContext | None, parameters: dict[str, Any]) -> str:
    """The default key: every argument of the call, by name (defaults included, as Prefect binds them)."""
    try:
        return stable_hash(parameters)
    except Exception:
        for name, value in parameters.items():
            try:
                stable_hash(value)
            except Exception:
                task_name = context.task.name if context else "?"
                raise UnhashableInput(
                    f"cannot cache task {task_name!r}: its argument {name!r} ({type(value).__name__}) cannot be "
                    f"hashed into a cache key; leave it out of the key with @cached_task(exclude=[{name!r}]) "
                    "or build the key yourself with cache_key_fn=..."
                ) from None
        raise


def task_identity(fn: Callable[..., Any], version: str | None = None) -> str:
    identity = f"{fn.__module__}.{fn.__qualname__}"
    return f"{identity}@{version}" if version else identity


# Prefect logs a key function's exception and runs the task uncached, so a key that cannot be
# computed would go unnoticed; the key function parks its exception here, by task run, and
# the task's own function raises it (see `_raise_key_failure`).
_key_failures: dict[UUID, Exception] = {}


def namespaced_key(
    fn: Callable[..., Any], key_fn: KeyFn, exclude: frozenset[str] = frozenset(), version: str | None = None
) -> KeyFn:
    """Prefix keys with the task's name and hash them with its identity.

    Two tasks called with the same inputs then never share an entry, and any key the
    user returns becomes a safe file name.
    """
    identity = task_identity(fn, version)
    prefix = re.sub(r"[^a-z0-9]+", "-", fn.__name__.lower()).strip("-")[:KEY_PREFIX_CHARS] or "task"

    def key(context: TaskRunContext | None, parameters: dict[str, Any]) -> str | None:
        kept = {name: value for name, value in parameters.items() if name not in exclude}
        try:
            user_key = key_fn(context, kept)
        except Exception as exc:
            if context is None:
                raise
            _key_failures[context.task_run.id] = exc
            return None
        if user_key is None:
            return None
        digest = hashlib.sha256(f"{identity}\n{user_key}".encode()).hexdigest()
        return f"{prefix}-{digest[:KEY_DIGEST_CHARS]}"

    return key


def _raise_key_failure() -> None:
    context = TaskRunContext.get()
    failure = _key_failures.pop(context.task_run.id, None) if context else None
    if failure is not None:
        raise failure


def raising_key_failures(fn: Callable[P, R]) -> Callable[P, R]:
    """`fn`, first raising the exception its key function parked: the task run then fails with it."""
    if inspect.iscoroutinefunction(fn):

        @functools.wraps(fn)
        async def run_async(*args: Any, **kwargs: Any) -> Any:
            _raise_key_failure()
            return await fn(*args, **kwargs)

        wrapper: Any = run_async
    else:

        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            _raise_key_failure()
            return fn(*args, **kwargs)

        wrapper = run
    # Prefect's marker for wrappers: it derives the task's key and source from `fn`, not from here.
    wrapper.__prefect_task_source__ = fn
    return wrapper


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


# Prefect task options that would take the task off the shared cache, and what to do instead.
_SET_BY_JUICECACHE = {
    "cache_policy": "choose the key with cache_key_fn= or exclude=",
    "result_storage": "results always go to the juicecache volume",
    "result_storage_key": "entries are named by their cache key",
    "persist_result": "cached results are always persisted",
}


def _check_options(fn: Callable[..., Any], exclude: frozenset[str], task_options: dict[str, Any]) -> None:
    for name, instead in _SET_BY_JUICECACHE.items():
        if name in task_options:
            raise TypeError(
                f"cached_task sets {name} itself ({instead}); use prefect.task for a task with its own {name}"
            )
    if inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn):
        raise TypeError(f"cached_task caches return values: {fn.__qualname__} is a generator function")
    unknown = sorted(exclude - set(inspect.signature(fn).parameters))
    if unknown:
        raise TypeError(f"cached_task(exclude=...): {fn.__qualname__} has no argument {', '.join(map(repr, unknown))}")


def _one_of(ours: Any, prefects: Any, names: str) -> Any:
    if ours is not None and prefects is not None:
        raise TypeError(f"cached_task: pass {names}, not both")
    return ours if ours is not None else prefects


@overload
def cached_task(fn: Callable[P, R], /) -> Task[P, R]: ...
@overload
def cached_task(
    *,
    cache_key_fn: KeyFn | None = None,
    exclude: Iterable[str] = (),
    expire: str | timedelta | None = None,
    refresh: bool | None = None,
    **task_options: Any,
) -> Callable[[Callable[P, R]], Task[P, R]]: ...


def cached_task(
    fn: Callable[P, R] | None = None,
    /,
    *,
    cache_key_fn: KeyFn | None = None,
    exclude: Iterable[str] = (),
    expire: str | timedelta | None = None,
    refresh: bool | None = None,
    **task_options: Any,
) -> Task[P, R] | Callable[[Callable[P, R]], Task[P, R]]:
    """Like `prefect.task`, with the shared juicecache cache.

    The key is the hash of every argument but those in `exclude` (or `cache_key_fn`'s
    value), namespaced by the task's module, name and `version`; results live on the
    mounted JuiceFS volume (or the local fallback, with one warning); a cross-host lock
    makes concurrent calls with a new key compute once; `expire` ("30s", "1h" or a
    timedelta) bounds an entry's life; `refresh` recomputes and overwrites. Any other
    Prefect task option is passed through (`cache_expiration` and `refresh_cache`, Prefect's
    names, are accepted for `expire` and `refresh`).
    """
    excluded = frozenset([exclude] if isinstance(exclude, str) else exclude)
    expiration = as_timedelta(_one_of(expire, task_options.pop("cache_expiration", None), "expire or cache_expiration"))
    overwrite = _one_of(refresh, task_options.pop("refresh_cache", None), "refresh or refresh_cache")

    def decorate(function: Callable[P, R]) -> Task[P, R]:
        _check_options(function, excluded, task_options)
        key = namespaced_key(function, cache_key_fn or hash_inputs, excluded, task_options.get("version"))
        options = {"result_serializer": RawPickleSerializer(), **task_options}
        return task(
            raising_key_failures(function),
            cache_policy=cache_policy(key),
            result_storage=EntryStorage.create(DATA, _store_config),
            persist_result=True,
            cache_expiration=expiration,
            refresh_cache=overwrite or None,
            **options,
        )

    return decorate(fn) if fn is not None else decorate
