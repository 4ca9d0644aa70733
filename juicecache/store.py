"""One cache store: where entries live, how they are checked, and who holds which key.

Assembled from parts, as Prefect's `ResultStore` is: a location (resolved from the
settings on first use, in the process that uses it), a signer, a lock manager, and the
two Prefect storage blocks, `records` (the policy's key storage) and `data` (the result
storage). `cached_task` binds to `DEFAULT_STORE`; a second store (a test, another volume)
is `Store(settings)`.

A store pickles as a reference, never as its state: `DEFAULT_STORE` becomes the default
store of the process that unpickles it, which resolves *its own host's* settings and
mount (a Dask worker, a `serve` subprocess, a task worker on another machine), and lock
state never leaves the process that holds the locks. A store built from explicit
settings carries those settings.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from juicecache.entryfile import DATA, LOCKS, RECORDS, RESULTS_BLOCK, Signer
from juicecache.locking import FlockLockManager
from juicecache.settings import Settings, load_settings
from juicecache.storage import RESULTS, CheckedRecords, EntryStorage, ReadState, StoreConfig
from juicecache.transactions import commit_with_task, release_after_failed_read
from juicecache.volume import CacheLocation, cache_location

logger = logging.getLogger("juicecache")


@dataclass
class Resolved:
    """What a store resolved in this process: its settings, where entries go, how they are checked."""

    settings: Settings
    location: CacheLocation
    signer: Signer
    reads: ReadState
    refused: list[tuple[Path, str]] = field(default_factory=list)
    not_stored: set[str] = field(default_factory=set)

    def note_refused(self, path: Path, reason: str) -> None:
        """One warning per refused file and process, however often Prefect looks at it."""
        if any(seen == path for seen, _ in self.refused):
            return
        self.refused.append((path, reason))
        logger.warning("cache entry %s/%s refused (%s); recomputing it", path.parent.name, path.name, reason)

    def note_not_stored(self, key: str) -> None:
        """A read-only consumer's miss: said once per key and process."""
        if key not in self.not_stored:
            self.not_stored.add(key)
            logger.warning("read-only cache: the result of %s was computed, not stored", key)


class Store:
    """The shared cache as Prefect sees it: `records`, `data` and `lock_manager`.

    Args:
        settings: what to resolve the location from; None (the default store) reads `.env`
            and the environment of the process that first uses the store.
        remembered_records: how many checked records this process keeps, so that a later
            run reads one again with a `stat` instead of an open and a read; 0 reads each
            afresh on every run, as a new process would (the benchmark's hits).
    """

    def __init__(self, settings: Settings | None = None, remembered_records: int = 256) -> None:
        self._settings = settings
        self._remembered_records = remembered_records
        self._resolved: Resolved | None = None
        self._guard = threading.Lock()
        self.records = EntryStorage.create(RECORDS, self.config)
        self.data = EntryStorage.create(DATA, self.config)
        self.lock_manager = FlockLockManager(self.locks_folder, self.lock_timeout, self.read_only, self.holds_hit)

    def resolve(self, settings: Settings | None = None) -> Resolved:
        """Resolve (again, when `settings` are given) where this store's entries go; warn once if falling back."""
        with self._guard:
            if self._resolved is None or settings is not None:
                settings = settings or self._settings or load_settings()
                location = cache_location(settings)
                if location.warning:
                    logger.warning(location.warning)
                reads = ReadState(CheckedRecords(self._remembered_records))
                self._resolved = Resolved(settings, location, Signer(settings.signing_key.encode()), reads)
                if self is DEFAULT_STORE:
                    register_results_block(self.data)
            return self._resolved

    @property
    def resolved(self) -> Resolved:
        return self._resolved or self.resolve()

    def resolved_if_any(self) -> Resolved | None:
        """What this process resolved, if it did yet (never resolves)."""
        return self._resolved

    def config(self) -> StoreConfig:
        resolved = self.resolved
        return StoreConfig(
            resolved.location.path,
            resolved.signer,
            on_refused=resolved.note_refused,
            on_record_read=commit_with_task,
            on_read_failed=release_after_failed_read,
            read_only=self.read_only,
            on_not_stored=resolved.note_not_stored,
            reads=resolved.reads,
        )

    def locks_folder(self) -> Path:
        return self.resolved.location.path / LOCKS

    def lock_timeout(self) -> float:
        return self.resolved.settings.lock_timeout

    def read_only(self) -> bool:
        return self.resolved.location.read_only

    def holds_hit(self, key: str) -> bool:
        """Is `key`'s entry committed and sound, so that its run needs no lock? (see `locking`)"""
        return self.records.holds_hit(key)

    def __reduce__(self) -> tuple[Any, ...]:
        if self is DEFAULT_STORE:
            return (default_store, ())
        return (Store, (self._settings, self._remembered_records))


def register_results_block(storage: EntryStorage) -> None:
    """Give `storage` the id of a block document the Prefect server knows, so that any process
    can read a result from a task run's state (`state.result()`, `future.result()` of a
    background task), not only the process that ran it.

    Prefect records the result storage's block id in every state it stores, and a process
    that never ran the task loads that block from the server to read the result. The
    document (`juicecache-results`, made once per server) holds no settings: the process
    that loads it reads through its own default store, whole records at a time (see
    `storage.RESULTS`). One API call per process; without a server, entries keep a fixed id
    that no server knows, as before, and only the running process can read its results.
    """
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    slug = EntryStorage.get_block_type_slug()
    try:
        with get_client(sync_client=True) as client:
            try:
                storage._block_document_id = client.read_block_document_by_name(RESULTS_BLOCK, slug).id
                return
            except ObjectNotFound:
                pass
        try:
            storage._block_document_id = EntryStorage(kind=RESULTS).save(RESULTS_BLOCK, _sync=True)  # type: ignore[call-arg]
        except ValueError:  # another process made it meanwhile
            with get_client(sync_client=True) as client:
                storage._block_document_id = client.read_block_document_by_name(RESULTS_BLOCK, slug).id
    except Exception as exc:  # no server: results stay readable by the process that ran the task
        logger.debug("results block not registered with the Prefect server: %s", exc)


def default_store() -> Store:
    """The store `cached_task` uses unless given another (one per process)."""
    return DEFAULT_STORE


DEFAULT_STORE = Store()
