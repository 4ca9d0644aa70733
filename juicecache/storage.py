"""Cache entries on disk: atomic, checked and optionally signed files, as a Prefect storage block.

Prefect's `LocalFileSystem` writes result files in place and hands whatever bytes it
finds to its deserializer, which may unpickle them. On a volume shared by many machines
that is not enough, so every file written here:

- becomes visible atomically (temporary file, fsync, rename in the same folder), so a
  writer killed at any moment never leaves a partial entry behind;
- starts with a one-line header carrying a digest of the content (SHA-256, or an
  HMAC-SHA256 with a key id when `JUICECACHE_SIGNING_KEY` is set) bound to the file's
  name, so a truncated, garbage, swapped or forged file is refused *before* Prefect
  parses or unpickles anything, and is then a plain cache miss.

The store keeps two folders, as Prefect's `key_storage` option expects: `records/`
holds each key's small metadata record (read on every cache lookup), `data/` the
result payload (read only on a hit). A third, `parameters/`, holds what Prefect writes
through a task's result storage for a background run (`task.delay(...)`): its parameters,
read by whichever task worker picks the run up (see `parameters_name`).
"""

from __future__ import annotations

import base64
import collections
import errno
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import ClassVar

import anyio.to_thread
from prefect.filesystems import WritableFileSystem
from pydantic import PrivateAttr

from juicecache.entries import note_record
from juicecache.entryfile import (
    BLOCK_ID,
    BLOCK_TYPE_SLUG,
    DATA,
    MAX_HEADER,
    PARAMETERS,
    RECORDS,
    EntryHeader,
    EntryRefused,
    Signer,
    write_atomically,
)
from juicecache.serializer import SERIALIZER_TYPE
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
    # A read-only consumer: writes are dropped, and this is told the name of each record not stored.
    read_only: bool = False
    on_not_stored: Callable[[str], None] | None = None


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
        with _reporting_io_errors(kind, target, "reading"):
            if kind == PARAMETERS:
                return _read_entry(target, PARAMETERS, config)[0]
            if self.kind == RESULTS:
                return _whole_record(config.root, target.name, config)
            if self.kind == DATA:
                checked = _checked_payloads.current(target, hand_out=True)
                if checked is not None:
                    return checked
                return _read_entry(target, DATA, config)[0]
            if config.on_record_read is not None:
                config.on_record_read(target.name)
            checked = _checked_records.current(target)
            if checked is not None:
                self._check_payload(checked, config)
                return checked
            content, identity = _read_entry(target, RECORDS, config)
            self._check_payload(content, config)
        _checked_records.keep(target, content, identity)
        return content

    def _check_payload(self, record: bytes, config: StoreConfig) -> None:
        """Serve a record only when the payload it names checks out too.

        Prefect decides a hit from the record alone and reads the payload afterwards;
        a payload refused at that point would fail the task instead of recomputing it.
        A missing payload (removed by `cache gc`) is a quiet miss. The checked payload is
        kept for the read that follows, so a hit reads and hashes it once.
        """
        payload = config.root / DATA / entry_name(json.loads(record)["storage_key"])
        if not _checked_payloads.knows(payload):
            _checked_payloads.keep(payload, *_read_entry(payload, DATA, config))

    def write_path(self, path: str, content: bytes, _sync: bool | None = None) -> str:
        kind, target = self._target(path)
        config = self.config()
        # A background run's parameters are no cache entry: a read-only consumer still submits runs.
        if config.read_only and kind != PARAMETERS:
            if self.kind == RECORDS and config.on_not_stored is not None:
                config.on_not_stored(target.name)
            return str(target)
        signer = config.signer
        header = EntryHeader(
            size=len(content),
            digest=signer.digest(f"{kind}/{target.name}", content),
            algorithm=signer.algorithm,
            key_id=signer.key_id,
            host=socket.gethostname(),
            created=time.time(),
            **_current_task(),
        )
        line = header.to_line()
        with _reporting_io_errors(kind, target, "writing"):
            inode = write_atomically(target, [line, content])
        if kind == RECORDS:
            note_record(config.root, target.name, inode, line + content)
        return str(target)

    async def aread_path(self, path: str) -> bytes:
        return await anyio.to_thread.run_sync(self.read_path, path)

    async def awrite_path(self, path: str, content: bytes) -> str:
        return await anyio.to_thread.run_sync(self.write_path, path, content)

Identity = tuple[int, int, int]  # inode, size, mtime: a file replaced since is another file


def _read_entry(target: Path, kind: str, config: StoreConfig) -> tuple[bytes, Identity]:
    """An entry file's content, once its header checks out, and the identity of the file read."""
    with open(target, "rb") as handle:
        line = handle.readline(MAX_HEADER)
        try:
            header = EntryHeader.from_line(line)
            content = handle.read()
            config.signer.check(f"{kind}/{target.name}", header, content)
        except EntryRefused as refused:
            if config.on_refused is not None:
                config.on_refused(target, str(refused))
            else:
                logger.warning("cache entry %s refused (%s): recomputing", target, refused)
            raise
        return content, _identity(os.fstat(handle.fileno()))


def _whole_record(root: Path, key: str, config: StoreConfig) -> bytes:
    """An entry as one JSON result record (its metadata and its result as text), the form
    Prefect reads from a result storage that has no separate metadata storage: what
    `state.result()` and `future.result()` read in a process that did not run the task."""
    record = json.loads(_read_entry(root / RECORDS / key, RECORDS, config)[0])
    payload = _read_entry(root / DATA / entry_name(record["storage_key"]), DATA, config)[0]
    raw = record.get("serializer", {}).get("type") == SERIALIZER_TYPE
    result = base64.b64encode(payload).decode("ascii") if raw else payload.decode()
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


class _CheckedFiles:
    """Entry files this process read and checked, until they are read again.

    Keyed by the file's inode, size and mtime: a file replaced since (entries are only
    ever replaced by rename) is read and checked again. Each look costs one `stat`
    instead of an open, a read and a close, each a round trip to JuiceFS's metadata
    engine. Prefect reads a hit's record twice (its exists check, then its read), then
    the payload: the second record read and the payload read are such looks. Only the
    last `keep_last` files are kept.
    """

    def __init__(self, keep_last: int) -> None:
        self._keep_last = keep_last
        self._guard = threading.Lock()
        self._known: collections.OrderedDict[str, tuple[Identity, bytes | None]] = collections.OrderedDict()

    def keep(self, path: Path, content: bytes, identity: Identity) -> None:
        with self._guard:
            self._known[str(path)] = (identity, content)
            self._known.move_to_end(str(path))
            while len(self._known) > self._keep_last:
                self._known.popitem(last=False)

    def knows(self, path: Path) -> bool:
        """Was the file at `path` checked as it is now (its content perhaps handed out since)?"""
        return self._look(path) is not None

    def current(self, path: Path, hand_out: bool = False) -> bytes | None:
        """The checked content, if the file is still the one checked; `hand_out`: only once."""
        known = self._look(path)
        if known is None or known[1] is None:
            return None
        if hand_out:
            with self._guard:
                self._known[str(path)] = (known[0], None)
        return known[1]

    def forget(self) -> None:
        with self._guard:
            self._known.clear()

    def _look(self, path: Path) -> tuple[Identity, bytes | None] | None:
        with self._guard:
            if str(path) not in self._known:  # never seen: no need to stat it
                return None
        identity = _identity(os.stat(path))
        with self._guard:
            known = self._known.get(str(path))
        return known if known is not None and known[0] == identity else None


def _identity(status: os.stat_result) -> Identity:
    return status.st_ino, status.st_size, status.st_mtime_ns


# A large payload is held only until the read that takes it; records are a few hundred
# bytes, and a fan-out reads many of them between a record's two reads.
_checked_payloads = _CheckedFiles(keep_last=4)
_checked_records = _CheckedFiles(keep_last=256)


def forget_checked_files() -> None:
    """Read every entry afresh from now on, as a new process would (the benchmark's hits do)."""
    for files in (_checked_payloads, _checked_records):
        files.forget()


# Prefect swallows a storage failure (a failed read is a miss, a failed write leaves the result
# uncached), so it is reported here: one line per kind of failure, at most once a minute (a run
# shows one line, a long-lived worker is not flooded). A missing entry is a plain miss, and a
# dead mount is reported as an error by the caller.
_QUIET_ERRNOS = {errno.ENOENT, errno.ENOTCONN, errno.ECONNABORTED}
_REPORT_EVERY = 60.0
_last_reported: dict[int | None, float] = {}


@contextmanager
def _reporting_io_errors(kind: str, path: Path, doing: str) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        now = time.monotonic()
        if exc.errno not in _QUIET_ERRNOS and now - _last_reported.get(exc.errno, -_REPORT_EVERY) >= _REPORT_EVERY:
            _last_reported[exc.errno] = now
            logger.warning(
                "the cache storage failed (%s %s %s/%s): results are computed and not cached until it recovers",
                exc.strerror or type(exc).__name__, doing, kind, path.name,
            )
        raise


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
