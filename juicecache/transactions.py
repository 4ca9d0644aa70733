"""A cached task's entry is committed when the task ends, not when its parent does.

Prefect runs each task in a transaction. A transaction opened inside another one (a task
called from a task, or inside `with transaction():`) hands its commit to its parent by
default (Prefect's `CommitMode.LAZY`): the entry is written, and the key's lock released,
only when the outermost transaction commits. For a shared cache that is wrong twice over:
the same cached task called again with the same inputs inside that parent waits on its own
lock until `JUICECACHE_LOCK_TIMEOUT` and fails, and every other host waits for the whole
parent instead of for the computation.

An entry is the value of a pure computation, so nothing is lost by committing it at once:
juicecache switches the task's own transaction to `CommitMode.EAGER` while it runs (on a
miss from the task's function, on a hit from the read of its record). A parent that later
rolls back leaves the entry in place, as it leaves any other cache entry.
"""

from __future__ import annotations

import time

from prefect.transactions import CommitMode, TransactionState, get_transaction

# Where the running transaction keeps when its task's function started (see `compute_started`).
_STARTED = "juicecache.compute-started"


def commit_with_task(key: str) -> None:
    """Make the running transaction of cache key `key` commit as soon as its task ends.

    Does nothing outside such a transaction: Prefect also reads records while the parent
    transaction is the active one (its existence check), and the parent keeps its mode.
    """
    transaction = get_transaction()
    if transaction is not None and transaction.key == key:
        transaction.commit_mode = CommitMode.EAGER


def release_after_failed_read(key: str) -> None:
    """Let go of the lock of cache key `key` when its hit could not be read.

    A run that waited for the lock while another run computed the key finds the entry
    under it; Prefect releases the lock when the transaction commits, and a read that fails
    then (the metadata engine restarting) would keep it until the process ends: Prefect's
    rollback skips a transaction that found its entry. Releasing it again later is a no-op.
    """
    transaction = get_transaction()
    if transaction is None or transaction.key != key or transaction.state is not TransactionState.COMMITTED:
        return
    store = transaction.store
    holder = transaction._holder  # what Prefect's own commit releases with
    if store is not None and store.lock_manager is not None and store.is_lock_holder(key, holder):
        store.release_lock(key, holder=holder)


def compute_started() -> None:
    """Note, in the running transaction, that its task's function starts computing now."""
    transaction = get_transaction()
    if transaction is not None:
        transaction.set(_STARTED, time.time())


def compute_seconds() -> float | None:
    """How long the running transaction's task computed, when it is committed: what each
    later hit of its entry saves (`cache report`). None outside a computation."""
    transaction = get_transaction()
    started = transaction.get(_STARTED, None) if transaction is not None else None
    return round(time.time() - started, 3) if started is not None else None
