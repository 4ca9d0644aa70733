"""Cache entries on disk: atomic, checked and optionally signed files, as a Prefect storage block.

Prefect's `LocalFileSystem` writes result files in place and hands whatever bytes it
finds to its deserializer, which may unpickle them. On a volume shared by many machines
that is not enough, so every file written here:

- becomes visible atomically (temporary file, fsync, rename in the same folder), so a
  writer killed at any moment never leaves a partial entry behind;
- starts with a one-line header carrying a digest of the content (BLAKE3, keyed with
  a key id when `JUICECACHE_SIGNING_KEY` is set) bound to the file's name, so a
  truncated, garbage, swapped or forged file is refused *before* Prefect parses or
  unpickles anything, and is then a plain cache miss.

The store keeps two folders, as Prefect's `key_storage` option expects: `records/`
holds each key's small metadata record (read on every cache lookup), `data/` the
result payload. A small payload (most results) is carried at the end of its record
instead, so that a hit opens one file, not two: Prefect writes a task run's payload, then
its record, and `write_path` holds the first for the second. A third, `parameters/`,
holds what Prefect writes through a task's result storage for a background run
(`task.delay(...)`): its parameters, read by whichever task worker picks the run up (see
`parameters_name`).
"""

from __future__ import annotations

import base64
import collections
import errno
import functools
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import ClassVar

import anyio.to_thread
from prefect.filesystems import WritableFileSystem
from pydantic import PrivateAttr

from juicecache.bytespickle import PickledBytes
from juicecache.entryfile import (
    BLOCK_ID,
    BLOCK_TYPE_SLUG,
    DATA,
    INLINE_MAX_BYTES,
    PARAMETERS,
    RECORDS,
    EntryHeader,
    EntryRefused,
    ReadContent,
    Signer,
    read_entry,
    write_atomically,
)
from juicecache.listing import note_record
from juicecache.serializer import SERIALIZER_TYPE, payload_parts
from juicecache.transactions import compute_seconds

logger = logging.getLogger("juicecache")
# The kind of the block the Prefect server knows (see `store.register_results_block`): whole records.
RESULTS = "results"



@dataclass(frozen=True)
class StoreConfig:
    """Where the store lives and how it checks entries, resolved when first needed."""

    root: Path
    signer: Signer
    on_refused: Callable[[Path, str], None] | None = None
    # Told the name of every record read: a hit's transaction commits when its task ends (see `transactions`).
    on_record_read: Callable[[str], None] | None = None
    # Told the name of an entry whose read failed: a hit's run lets go of its lock (see `transactions`).
    on_read_failed: Callable[[str], None] | None = None
    # A read-only consumer: writes are dropped, and this is told the name of each record not stored.
    # Asked on a write only, so that a hit never asks the mount (see `volume.CacheLocation`).
    read_only: Callable[[], bool] = bool
    on_not_stored: Callable[[str], None] | None = None
    # What this store's process already read and checked (one per store: see `ReadState`).
    reads: ReadState = field(default_factory=lambda: ReadState())


class EntryStorage(WritableFileSystem):
    """A Prefect result storage whose files are atomic and checked (see the module docstring).

    Its configuration is resolved on first use, so a task can be declared at import
    time and still find the volume that is mounted when it runs.
    """

    _block_type_name: ClassVar[str] = "JuiceCache Entry Storage"
    _block_type_slug: ClassVar[str] = BLOCK_TYPE_SLUG

    kind: str
    _config: Callable[[], StoreConfig] | None = PrivateAttr(default=None)

    @classmethod
    def create(cls, kind: str, config: Callable[[], StoreConfig]) -> EntryStorage:
        storage = cls(kind=kind)
        storage._config = config
        # Prefect only accepts task result storage that is a saved server-side block. This
        # one is configured in-process on every host instead, so it carries a fixed id that
        # no server knows. A side benefit: Prefect then records the bare key, not the
        # writer's absolute path, in each record.
        storage._block_document_id = BLOCK_ID
        return storage

    def config(self) -> StoreConfig:
        """The store this block reads and writes. A block Prefect loads from the server (to
        read a result whose task this process never ran, see `store.register_results_block`)
        has none of its own: it uses this process's default store, resolved here."""
        if self._config is not None:
            return self._config()
        from juicecache.store import default_store  # the store is built from this module: imported late

        return default_store().config()

    @property
    def folder(self) -> Path:
        return self.config().root / self.kind

    def _resolve_path(self, path: str | None) -> Path:
        return self.folder / entry_name(path) if path else self.folder

    def _target(self, path: str) -> tuple[str, Path]:
        """The folder (`kind`) and file that `path` names: an entry, or a background run's parameters."""
        parameters = parameters_name(path)
        if parameters is not None:
            return PARAMETERS, self.config().root / PARAMETERS / parameters
        return self.kind, self._resolve_path(path)

    def read_path(self, path: str, _sync: bool | None = None) -> bytes:
        kind, target = self._target(path)
        config = self.config()
        try:
            return self._read(kind, target, config)
        except (OSError, EntryRefused):
            if config.on_read_failed is not None and kind != PARAMETERS:
                config.on_read_failed(target.name)
            raise

    def _read(self, kind: str, target: Path, config: StoreConfig) -> bytes:
        with _reporting_io_errors(kind, target, "reading", config.reads):
            if kind == PARAMETERS:
                return bytes(_read_entry(target, PARAMETERS, config)[1])
            if self.kind == RESULTS:
                return _whole_record(config.root, target.name, config)
            if self.kind == DATA:
                checked = config.reads.payloads.take(target)
                return checked if checked is not None else _read_payload(target, config)
            if config.on_record_read is not None:
                config.on_record_read(target.name)
            checked = config.reads.records.current(target)
            record = checked or _read_record(target, config)
            self._check_payload(record, config)
        if checked is None:
            config.reads.records.keep(target, record)
        return record.metadata

    def holds_hit(self, key: str) -> bool:
        """Is `key`'s entry committed, unexpired and sound, record and payload, so that this
        run is a hit and needs no lock (see `locking`)? Both files are then kept, checked, for
        the reads Prefect makes next (its existence check, the record, the payload), which
        cost no further round trip and find the entry even if `cache gc` removes it meanwhile.

        Never for a run that refreshes its entry (`refresh_cache`): it computes, under the lock.
        Any failure is no hit: the run locks the key, and Prefect's own read reports it.
        """
        config = self.config()
        record_path = config.root / RECORDS / entry_name(key)
        # A run starts afresh: reads an earlier run was lent and never made are not this run's.
        config.reads.records.distrust(record_path)
        if _refreshing():
            return False
        try:
            record = _read_record(record_path, config)
            if _expires_soon(record.fields.get("expiration")):
                return False
            _keep_payload(_payload_path(record.fields, config), record, config)
        except (OSError, ValueError, KeyError, TypeError):
            return False
        config.reads.records.keep(record_path, record, trusted_reads=2)
        return True

    def _check_payload(self, record: Record, config: StoreConfig) -> None:
        """Serve a record only when the payload it names checks out too.

        Prefect decides a hit from the record alone and reads the payload afterwards;
        a payload refused at that point would fail the task instead of recomputing it.
        A missing payload (removed by `cache gc`) is a quiet miss. The checked payload is
        kept for the read that follows, so a hit reads and hashes it once; it is read again
        for any other record file that names it.
        """
        payload = _payload_path(record.fields, config)
        if not config.reads.payloads.holds(payload, record.identity):
            _keep_payload(payload, record, config)

    def write_path(self, path: str, content: bytes, _sync: bool | None = None) -> str:
        """Write an entry file. A small payload whose record Prefect writes next into this store
        is not written here: it travels inside that record (see `EntryHeader.inline`)."""
        kind, target = self._target(path)
        config = self.config()
        # A background run's parameters are no cache entry: a read-only consumer still submits runs.
        if kind != PARAMETERS and config.read_only():
            if self.kind == RECORDS and config.on_not_stored is not None:
                config.on_not_stored(target.name)
            return str(target)
        if kind == DATA and len(content) <= INLINE_MAX_BYTES and _record_follows(config):
            config.reads.unwritten.keep(target, bytes(content))
            return str(target)
        inline = _payload_to_inline(content, config) if kind == RECORDS else None
        body = content if inline is None else bytes(content) + inline[1]
        carried = None if inline is None else len(inline[1])
        signer = config.signer
        parts = payload_parts(body)  # a large result in its parts, never joined (`serializer.Framed`, `LargeBytes`)
        header = EntryHeader(
            size=len(body),
            digest=signer.digest(f"{kind}/{target.name}", parts, inline=carried),
            algorithm=signer.algorithm,
            key_id=signer.key_id,
            host=socket.gethostname(),
            created=time.time(),
            **_current_task(),
            inline=carried,
        )
        line = header.to_line()
        with _reporting_io_errors(kind, target, "writing", config.reads):
            inode = write_atomically(target, [line, *parts])
            if inline is not None:
                # A payload file the key had before (a larger result, or an older release's entry)
                # is nobody's now; removed here, as `cache gc` only removes payloads without a record.
                inline[0].unlink(missing_ok=True)
        if kind == RECORDS:
            note_record(config.root, target.name, inode, line + body)
        return str(target)

    async def aread_path(self, path: str) -> bytes:
        return await anyio.to_thread.run_sync(self.read_path, path)

    async def awrite_path(self, path: str, content: bytes) -> str:
        return await anyio.to_thread.run_sync(self.write_path, path, content)

Identity = tuple[int, int, int]  # inode, size, mtime: a file replaced since is another file
# A payload as read and checked, for Prefect's deserializer: a large bytes result in its parts.
Payload = bytes | ReadContent


@dataclass(frozen=True)
class Record:
    """A record file, read and checked: Prefect's metadata, and the payload if it carries it."""

    metadata: bytes
    payload: bytes | None  # None: the payload is a file of its own, in `data/`
    identity: Identity

    @functools.cached_property
    def fields(self) -> dict:
        """Prefect's metadata, parsed once per record read (a hit asks for it several times)."""
        return json.loads(self.metadata)


def _read_entry(
    target: Path, kind: str, config: StoreConfig, bytes_pickle: bool = False
) -> tuple[EntryHeader, ReadContent, Identity]:
    """An entry file's header and content, once they check out, and the identity of the file read.
    `bytes_pickle`: see `read_entry`."""
    try:
        header, content, status = read_entry(target, bytes_pickle)
        config.signer.check(f"{kind}/{target.name}", header, content)
    except EntryRefused as refused:
        if config.on_refused is not None:
            config.on_refused(target, str(refused))
        else:
            logger.warning("cache entry %s refused (%s): recomputing", target, refused)
        raise
    return header, content, _identity(status)


def _read_record(target: Path, config: StoreConfig) -> Record:
    header, content, identity = _read_entry(target, RECORDS, config)
    metadata, payload = header.split(bytes(content))
    return Record(metadata, payload, identity)


def _read_payload(target: Path, config: StoreConfig) -> Payload:
    """A payload not kept for this read: from its file, or from the record that carries it.
    Payloads come back as the buffer they were read into."""
    try:
        return _read_entry(target, DATA, config)[1]
    except FileNotFoundError:
        record = _read_record(config.root / RECORDS / target.name, config)
        if record.payload is None or _payload_path(record.fields, config) != target:
            raise
        return record.payload


def _payload_path(metadata: dict, config: StoreConfig) -> Path:
    """The payload file a record's metadata (Prefect's JSON, parsed) names."""
    return config.root / DATA / entry_name(metadata["storage_key"])


def _payload_of(record: Record, path: Path, config: StoreConfig) -> Payload:
    """The payload `record` names (at `path`): the one it carries, or its file's, read and checked;
    a large bytes result in its parts (see `bytespickle`), if juicecache's serializer wrote it."""
    if record.payload is not None:
        return record.payload
    return _read_entry(path, DATA, config, bytes_pickle=_raw_pickle(record.fields))[1]


def _raw_pickle(metadata: dict) -> bool:
    """Does a record's metadata (Prefect's JSON, parsed) name juicecache's serializer for its payload?"""
    return metadata.get("serializer", {}).get("type") == SERIALIZER_TYPE


def _keep_payload(path: Path, record: Record, config: StoreConfig) -> None:
    """Keep the payload at `path` for the read that takes it, for that record file only."""
    config.reads.payloads.keep(path, _payload_of(record, path, config), record.identity)


def _record_follows(config: StoreConfig) -> bool:
    """Does Prefect write a record into this store right after the payload it writes now?

    Only for a task run whose cache policy keeps its keys here (`key_storage`, see
    `cache.policy_on_volume`): Prefect then writes the payload, then the record. Anything
    else written through this block (a whole result record, when a task or flow uses it as
    its result storage without juicecache's keys; keys kept elsewhere) has no record to
    travel in, and is written as a file of its own.
    """
    from prefect.context import TaskRunContext

    context = TaskRunContext.get()
    keys = getattr(getattr(context.task, "cache_policy", None), "key_storage", None) if context is not None else None
    return isinstance(keys, EntryStorage) and keys.kind == RECORDS and keys.config().reads is config.reads


def _payload_to_inline(record: bytes, config: StoreConfig) -> tuple[Path, bytes] | None:
    """The small payload Prefect wrote just before this record (its path and bytes), to carry inside it."""
    try:
        path = _payload_path(json.loads(record), config)
    except (ValueError, KeyError, TypeError):
        return None
    payload = config.reads.unwritten.take(path)
    return None if payload is None else (path, payload)


def _whole_record(root: Path, key: str, config: StoreConfig) -> bytes:
    """An entry as one JSON result record (its metadata and its result as text), the form
    Prefect reads from a result storage that has no separate metadata storage: what
    `state.result()` and `future.result()` read in a process that did not run the task."""
    found = _read_record(root / RECORDS / key, config)
    record = found.fields
    payload = _payload_of(found, _payload_path(record, config), config)
    if isinstance(payload, PickledBytes):
        payload = b"".join(payload_parts(payload))
    result = base64.b64encode(payload).decode("ascii") if _raw_pickle(record) else payload.decode()
    return json.dumps({"metadata": record, "result": result}).encode()


def entry_name(path: str) -> str:
    """Entries are flat files named by key.

    Prefect may record the writer's absolute path; another host mounts the volume
    elsewhere, so only the file name is trusted and it is re-rooted by the reader.
    """
    name = Path(path).name
    if name in ("", ".", "..") or name.startswith("."):
        raise ValueError(f"invalid cache entry name {path!r}")
    return name


def parameters_name(path: str) -> str | None:
    """The file name in `parameters/` when `path` names a background run's parameters, else None.

    Prefect stores the parameters of `task.delay(...)` as `parameters/UUID` through the task's
    result storage, and its task worker reads them back from there. Flattened like an entry
    they would land in `data/`, where `cache gc` takes a payload without a record for a
    leftover and removes it, maybe before a worker has read it. Kept apart, they are on the
    volume for every host's workers, and `gc` removes them only when a week old.
    """
    parts = PurePosixPath(path).parts
    return entry_name(parts[1]) if len(parts) == 2 and parts[0] == PARAMETERS else None


@dataclass
class _Checked:
    record: Record
    trusted_reads: int  # reads still served as checked, without a look at the file (a hit's own reads)
    trusted_until: float  # ... and only until then (monotonic), should they never come


class CheckedRecords:
    """Records this process read and checked, until they are read again.

    Keyed by the file's inode, size and mtime: a file replaced since (entries are only
    ever replaced by rename) is read and checked again. Each look costs one `stat`
    instead of an open, a read and a close, each a round trip to JuiceFS's metadata
    engine. A hit's own reads, right after `EntryStorage.holds_hit` checked its record,
    need not even look: they are `trusted_reads`.

    Args:
        keep_last: how many records are kept besides those awaiting their trusted reads;
            0 reads every record afresh on each run, as a new process would (the benchmark).
    """

    def __init__(self, keep_last: int = 256) -> None:
        self._keep_last = keep_last
        self._guard = threading.Lock()
        self._known: collections.OrderedDict[str, _Checked] = collections.OrderedDict()

    def keep(self, path: Path, record: Record, trusted_reads: int = 0) -> None:
        with self._guard:
            self._known[str(path)] = _Checked(record, trusted_reads, time.monotonic() + _TRUST_SECONDS)
            self._known.move_to_end(str(path))
            self._evict()

    def current(self, path: Path) -> Record | None:
        """The checked record, if the file is still the one checked."""
        with self._guard:
            known = self._known.get(str(path))
            if known is None:  # never seen: no need to stat it
                return None
            if known.trusted_reads > 0 and time.monotonic() < known.trusted_until:
                known.trusted_reads -= 1
                self._evict()
                return known.record
        identity = _identity(os.stat(path))
        with self._guard:
            known = self._known.get(str(path))
        return known.record if known is not None and known.record.identity == identity else None

    def distrust(self, path: Path) -> None:
        """Take back the reads lent for `path`: its next read looks at the file again."""
        with self._guard:
            known = self._known.get(str(path))
            if known is not None:
                known.trusted_reads = 0

    def _evict(self) -> None:
        """Drop the oldest records beyond `keep_last`, but not those a hit is about to read."""
        now = time.monotonic()
        surplus = len(self._known) - self._keep_last
        for path in list(self._known):
            if surplus <= 0:
                break
            known = self._known[path]
            if known.trusted_reads <= 0 or now >= known.trusted_until:
                del self._known[path]
                surplus -= 1


class PendingPayloads:
    """Payloads held in memory until the read or write that takes them (a large one is large).

    A payload checked for a hit is held for the record file (`Identity`) it was checked
    for: a record read later, of another file (the entry replaced since), has its payload
    read and checked again. A small payload Prefect wrote waits for its record (no `Identity`).
    """

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._waiting: dict[str, tuple[Payload, Identity | None, float]] = {}

    def keep(self, path: Path, content: Payload, record: Identity | None = None) -> None:
        now = time.monotonic()
        with self._guard:
            self._waiting = {name: kept for name, kept in self._waiting.items() if kept[2] > now}
            self._waiting[str(path)] = (content, record, now + _TRUST_SECONDS)

    def holds(self, path: Path, record: Identity) -> bool:
        with self._guard:
            kept = self._waiting.get(str(path))
        return kept is not None and kept[1] == record and kept[2] > time.monotonic()

    def take(self, path: Path) -> Payload | None:
        with self._guard:
            kept = self._waiting.pop(str(path), None)
        return kept[0] if kept is not None and kept[2] > time.monotonic() else None


@dataclass
class ReadState:
    """What one store's process knows from its earlier reads; a new store starts afresh."""

    records: CheckedRecords = field(default_factory=CheckedRecords)
    payloads: PendingPayloads = field(default_factory=PendingPayloads)
    # Small payloads written, waiting for the record that carries them (see `EntryStorage.write_path`).
    unwritten: PendingPayloads = field(default_factory=PendingPayloads)
    # When each kind of storage failure was last reported (see `_reporting_io_errors`).
    failures_reported: dict[int | None, float] = field(default_factory=dict)


def _identity(status: os.stat_result) -> Identity:
    return status.st_ino, status.st_size, status.st_mtime_ns


# How long a hit's own reads are served from what `holds_hit` checked: they follow within
# milliseconds; a run cancelled in between must not leave its files trusted for long.
_TRUST_SECONDS = 60.0


# Prefect swallows a storage failure (a failed read is a miss, a failed write leaves the result
# uncached), so it is reported here: one line per kind of failure, at most once a minute (a run
# shows one line, a long-lived worker is not flooded). A missing entry is a plain miss, and a
# dead mount is reported as an error by the caller.
_QUIET_ERRNOS = {errno.ENOENT, errno.ENOTCONN, errno.ECONNABORTED}
_REPORT_EVERY = 60.0


@contextmanager
def _reporting_io_errors(kind: str, path: Path, doing: str, reads: ReadState) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        now = time.monotonic()
        reported = reads.failures_reported
        if exc.errno not in _QUIET_ERRNOS and now - reported.get(exc.errno, -_REPORT_EVERY) >= _REPORT_EVERY:
            reported[exc.errno] = now
            logger.warning(
                "the cache storage failed (%s %s %s/%s): results are computed and not cached until it recovers",
                exc.strerror or type(exc).__name__, doing, kind, path.name,
            )
        raise


def _refreshing() -> bool:
    """Does the running task refresh its entry (`refresh_cache`, or PREFECT_TASKS_REFRESH_CACHE)?"""
    from prefect.context import TaskRunContext
    from prefect.settings import PREFECT_TASKS_REFRESH_CACHE

    context = TaskRunContext.get()
    refresh = context.task.refresh_cache if context is not None else None
    return bool(PREFECT_TASKS_REFRESH_CACHE.value() if refresh is None else refresh)


def _expires_soon(expiration: str | None) -> bool:
    """Will a record with this `expiration` (Prefect's ISO date) be expired by the time Prefect
    looks at it again? Then it is no hit to take without the lock: Prefect computes it."""
    if expiration is None:
        return False
    return datetime.fromisoformat(expiration).timestamp() <= time.time() + _EXPIRY_MARGIN


# A record that expires this close to now is treated as expired already (see `_expires_soon`).
_EXPIRY_MARGIN = 1.0


def _current_task() -> dict[str, str | float | None]:
    """The header's `task`, `code` and `seconds`: the running task's name, the short digest of
    its code when its key follows it (see `code_version`), and how long it computed."""
    from prefect.context import TaskRunContext

    context = TaskRunContext.get()
    if context is None:
        return {"task": None, "code": None, "seconds": None}
    fingerprint = getattr(getattr(context.task.cache_policy, "cache_key_fn", None), "code", None)
    return {
        "task": context.task.name,
        "code": fingerprint.short if fingerprint is not None else None,
        "seconds": compute_seconds(),
    }
