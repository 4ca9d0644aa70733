"""The cache: keys, Prefect's cache policy wired to a store, and the `cached_task` decorator.

Prefect decides a hit by finding an unexpired result record under the policy's key
storage; this module only points that machinery at a `Store` (by default the one volume
this process mounts) and adds what Prefect lacks for a shared volume: keys that are the
same on every machine however the code was loaded (`task_identity`), an entry committed
when its task ends (`transactions`), and a key error that fails the task instead of
silently running it uncached.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Any, ParamSpec, TypeVar, overload
from uuid import UUID

from prefect import Task, task
from prefect.cache_policies import INPUTS, CacheKeyFnPolicy, CachePolicy
from prefect.context import FlowRunContext, TaskRunContext
from prefect.transactions import get_transaction
from prefect.utilities.hashing import hash_objects

from juicecache.code_version import CodeFingerprint, CodeMode
from juicecache.entryfile import KEY_DIGEST_CHARS, KEY_PREFIX_CHARS
from juicecache.fallback import show_fallback
from juicecache.serializer import RawPickleSerializer
from juicecache.settings import Settings, parse_duration
from juicecache.storage import EntryStorage
from juicecache.store import DEFAULT_STORE, Resolved, Store
from juicecache.transactions import commit_with_task, compute_started

logger = logging.getLogger("juicecache")

P = ParamSpec("P")
R = TypeVar("R")
KeyFn = Callable[[TaskRunContext, dict[str, Any]], str | None]


class UnhashableInput(TypeError):
    """An argument cannot be turned into a stable cache key."""


def activate(settings: Settings | None = None) -> Resolved:
    """Resolve the default store for this process (again, when `settings` are given)."""
    return DEFAULT_STORE.resolve(settings)


def active() -> Resolved:
    """What the default store resolved in this process (resolving it on first use)."""
    return DEFAULT_STORE.resolved


def activated() -> Resolved | None:
    """What the default store resolved in this process, if it did yet (never resolves it)."""
    return DEFAULT_STORE.resolved_if_any()


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


def task_identity(fn: Callable[..., Any], version: str | None = None, namespace: str | None = None) -> str:
    """The name a task's keys are salted with: the same however and wherever its code is loaded.

    The module's dotted name as its file's place among packages gives it (the file's name
    without `.py`, behind the names of the folders above it that hold an `__init__.py`),
    then the function's qualified name, e.g. `pkg.flows.prepare`: a script run (module
    `__main__`), an import, a deployment's entrypoint (Prefect may name the module after
    its absolute path) and a Dask worker unpickling the function all agree, on any checkout
    path. Code not loaded from a file keeps its module's name. `namespace` replaces it all.
    """
    identity = namespace or f"{defining_module(fn)}.{fn.__qualname__}"
    return f"{identity}@{version}" if version else identity


def defining_module(fn: Callable[..., Any]) -> str:
    path = Path(inspect.unwrap(fn).__code__.co_filename)
    if path.suffix != ".py":  # <stdin>, <string>: no file to name
        return fn.__module__
    parts = [] if path.stem == "__init__" else [path.stem]
    folder = path.parent
    while (folder / "__init__.py").is_file():
        parts.insert(0, folder.name)
        folder = folder.parent
    return ".".join(parts) or fn.__module__


@dataclass(frozen=True)
class NamespacedKey:
    """A task's key function: the user's key, prefixed with the task's name and hashed with its identity.

    Two tasks called with the same inputs then never share an entry, and any key the user
    returns becomes a safe file name. A dataclass, not a closure, so that it pickles.

    It also resolves the store for the run (a strict store without its volume fails the
    task here), and marks a flow run whose entries go to the local fallback.
    """

    key_fn: KeyFn
    identity: str
    prefix: str
    store: Store
    exclude: frozenset[str] = frozenset()
    code: CodeFingerprint | None = None
    # Prefect logs a key function's exception and runs the task uncached, so a key that cannot
    # be computed would go unnoticed: it is parked in `failures`, by task run, for the task's
    # own function to raise (`_start_in_cache`). A plain task (`shared()`) has no such wrapper,
    # and is left to Prefect, which logs the failure and runs the task uncached.
    parks_failures: bool = True
    failures: dict[UUID, Exception] = field(default_factory=dict, compare=False, repr=False)

    def __call__(self, context: TaskRunContext | None, parameters: dict[str, Any]) -> str | None:
        kept = {name: value for name, value in parameters.items() if name not in self.exclude}
        try:
            if context is not None:
                show_fallback(self.store.resolved.location)
            user_key = self.key_fn(context, kept)
        except Exception as exc:
            if context is None or not self.parks_failures:
                raise
            self.failures[context.task_run.id] = exc
            return None
        if user_key is None:
            return None
        salt = f"{self.identity}\ncode {self.code.digest()}" if self.code else self.identity
        digest = hashlib.sha256(f"{salt}\n{user_key}".encode()).hexdigest()
        return f"{self.prefix}-{digest[:KEY_DIGEST_CHARS]}"

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "failures": {}}  # a failure belongs to the process whose run hit it

    def __deepcopy__(self, memo: dict[int, Any]) -> NamespacedKey:
        # Prefect's `configure` deep-copies the policy; the task's wrapper must still find the
        # failures this key function parks, so the copy is this very object (it is immutable).
        return self


@dataclass(frozen=True)
class PolicyKey:
    """A Prefect cache policy (`INPUTS + TASK_SOURCE`, `INPUTS - "debug"`...) as a key function:
    the key Prefect would compute, which `NamespacedKey` then namespaces and stores on the volume."""

    policy: CachePolicy

    def __call__(self, context: TaskRunContext | None, parameters: dict[str, Any]) -> str | None:
        flow_run = FlowRunContext.get()
        return self.policy.compute_key(
            task_ctx=context, inputs=parameters, flow_parameters=flow_run.parameters if flow_run else {}
        )


@dataclass
class TaskKeys:
    """`shared()`'s key function: namespaces keys by whichever plain Prefect task runs it,
    as `cached_task` does for its own. Outside a task run there is no task to name: no key."""

    key_fn: KeyFn
    store: Store
    code: CodeMode | None = None
    _by_function: dict[Any, NamespacedKey] = field(default_factory=dict, compare=False, repr=False)

    def __call__(self, context: TaskRunContext | None, parameters: dict[str, Any]) -> str | None:
        if context is None:
            return None
        fn = inspect.unwrap(context.task.fn)
        if fn not in self._by_function:
            namespaced = namespaced_key(fn, self.key_fn, version=context.task.version, store=self.store, code=self.code)
            self._by_function[fn] = replace(namespaced, parks_failures=False)
        return self._by_function[fn](context, parameters)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_by_function": {}}


def namespaced_key(
    fn: Callable[..., Any],
    key_fn: KeyFn,
    exclude: frozenset[str] = frozenset(),
    version: str | None = None,
    namespace: str | None = None,
    store: Store = DEFAULT_STORE,
    code: CodeMode | None = None,
) -> NamespacedKey:
    """The key function of `fn`'s task: see `NamespacedKey`, `task_identity` and `code_version`."""
    prefix = re.sub(r"[^a-z0-9]+", "-", fn.__name__.lower()).strip("-")[:KEY_PREFIX_CHARS] or "task"
    fingerprint = CodeFingerprint(fn, code) if code is not None else None
    return NamespacedKey(key_fn, task_identity(fn, version, namespace), prefix, store, exclude, fingerprint)


def _start_in_cache(key: NamespacedKey) -> None:
    """What a cached task does before its function: raise the exception its `key` function
    parked (the task run then fails with it), commit its entry when it ends, and note when
    it started computing (the entry records how long that took)."""
    context = TaskRunContext.get()
    failure = key.failures.pop(context.task_run.id, None) if context else None
    if failure is not None:
        raise failure
    transaction = get_transaction()
    if transaction is not None and transaction.key is not None:
        commit_with_task(transaction.key)
        compute_started()


def running_in_cache(fn: Callable[P, R], key: NamespacedKey) -> Callable[P, R]:
    """`fn`, started by `_start_in_cache` (with the key function of its task)."""
    if inspect.iscoroutinefunction(fn):

        @functools.wraps(fn)
        async def run_async(*args: Any, **kwargs: Any) -> Any:
            _start_in_cache(key)
            return await fn(*args, **kwargs)

        wrapper: Any = run_async
    else:

        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            _start_in_cache(key)
            return fn(*args, **kwargs)

        wrapper = run
    # Prefect's marker for wrappers: it derives the task's key and source from `fn`, not from here.
    wrapper.__prefect_task_source__ = fn
    return wrapper


def shared(policy: CachePolicy = INPUTS, code: CodeMode | None = None, store: Store | None = None) -> CacheKeyFnPolicy:
    """A Prefect cache policy for a plain `@task`, run on the shared volume as `cached_task` runs it.

        @task(cache_policy=juicecache.shared(INPUTS), result_storage=juicecache.shared_storage(),
              result_serializer="juicecache-pickle", persist_result=True)

    Args:
        policy: any Prefect cache policy; its key is namespaced by the task's identity.
        code: also key on the task's code (`"task"` or `"calls"`, see `code_version`).
        store: where entries go; default: the store of the volume this process mounts.
    """
    target = store or DEFAULT_STORE
    return policy_on_volume(TaskKeys(PolicyKey(_volume_free(policy)), target, code), target)


def shared_storage(store: Store | None = None) -> EntryStorage:
    """The result storage that goes with `shared()`: payloads on the volume, checked like every entry."""
    return (store or DEFAULT_STORE).data


def _volume_free(policy: CachePolicy) -> CachePolicy:
    """A user's policy, refused if it brings its own storage, lock or isolation: ours replace them."""
    if not isinstance(policy, CachePolicy):
        raise TypeError(f"cache_policy: {policy!r} is not a Prefect cache policy (e.g. INPUTS + TASK_SOURCE)")
    for option in ("key_storage", "lock_manager", "isolation_level"):
        if getattr(policy, option, None) is not None:
            raise TypeError(f"cache_policy: juicecache sets {option} itself (on the shared volume); leave it out of .configure()")
    return policy


def policy_on_volume(key_fn: KeyFn, store: Store = DEFAULT_STORE) -> CacheKeyFnPolicy:
    """Prefect's own key-function policy, serialized by the store's lock, keys stored in the store.

    `cache_key_fn=` and `cache_policy=` cannot be given to Prefect together (the policy is
    silently dropped), so the key function lives inside the policy.
    """
    return CacheKeyFnPolicy(cache_key_fn=key_fn).configure(
        key_storage=store.records,
        lock_manager=store.lock_manager,
        isolation_level="SERIALIZABLE",
    )


def as_timedelta(expire: str | timedelta | None) -> timedelta | None:
    if expire is None or isinstance(expire, timedelta):
        return expire
    return parse_duration(expire)


# Prefect task options that would take the task off the shared cache, and what to do instead.
_SET_BY_JUICECACHE = {
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
    namespace: str | None = None,
    code: CodeMode | None = "task",
    cache_policy: CachePolicy | None = None,
    store: Store | None = None,
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
    namespace: str | None = None,
    code: CodeMode | None = "task",
    cache_policy: CachePolicy | None = None,
    store: Store | None = None,
    **task_options: Any,
) -> Task[P, R] | Callable[[Callable[P, R]], Task[P, R]]:
    """Like `prefect.task`, with the shared juicecache cache.

    Results live on the mounted JuiceFS volume (or the local fallback, with one warning),
    and a cross-host lock makes concurrent calls with a new key compute once.

    Args:
        cache_key_fn: `f(context, arguments) -> str | None` builds the key (None: do not
            cache this call); default: the hash of every argument.
        exclude: argument names left out of the key.
        expire: an entry's lifetime, "30s", "1h" or a timedelta (Prefect's `cache_expiration`).
        refresh: recompute and overwrite (Prefect's `refresh_cache`).
        namespace: the task's identity in its keys, instead of its file and qualified name
            (see `task_identity`); `version` is added to either.
        code: `"task"` (default) keys on the task function's normalized code, `"calls"` also
            on the user code it calls, None on no code (see `code_version`).
        cache_policy: a Prefect cache policy to compute the key instead (`INPUTS + TASK_SOURCE`,
            `INPUTS - "debug"`...), run on the shared volume; not with `cache_key_fn`.
        store: where entries go; default: the store of the volume this process mounts.
        task_options: any other `prefect.task` option, passed through.
    """
    excluded = frozenset([exclude] if isinstance(exclude, str) else exclude)
    expiration = as_timedelta(_one_of(expire, task_options.pop("cache_expiration", None), "expire or cache_expiration"))
    overwrite = _one_of(refresh, task_options.pop("refresh_cache", None), "refresh or refresh_cache")
    if cache_policy is not None and cache_key_fn is not None:
        raise TypeError("cached_task: pass cache_key_fn or cache_policy, not both")
    key_fn = PolicyKey(_volume_free(cache_policy)) if cache_policy is not None else cache_key_fn or hash_inputs

    def decorate(function: Callable[P, R]) -> Task[P, R]:
        _check_options(function, excluded, task_options)
        target = store or DEFAULT_STORE
        key = namespaced_key(function, key_fn, excluded, task_options.get("version"), namespace, target, code)
        options = {"result_serializer": RawPickleSerializer(), **task_options}
        return task(
            running_in_cache(function, key),
            cache_policy=policy_on_volume(key, target),
            result_storage=target.data,
            persist_result=True,
            cache_expiration=expiration,
            refresh_cache=overwrite or None,
            **options,
        )

    return decorate(fn) if fn is not None else decorate
