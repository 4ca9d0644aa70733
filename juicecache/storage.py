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
result payload (read only on a hit).
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import json
import logging
import os
import secrets
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import anyio.to_thread
from prefect.filesystems import WritableFileSystem
from pydantic import PrivateAttr

logger = logging.getLogger("juicecache")

MAGIC = b"JCE1 "
RECORDS = "records"
DATA = "data"
LOCKS = "locks"
TEMP_PREFIX = ".tmp-"
BLOCK_ID = uuid.uuid5(uuid.NAMESPACE_URL, "juicecache:entry-storage")
# Cap the header so a garbage file without a newline is refused without reading it all.
MAX_HEADER = 4096


class EntryRefused(ValueError):
    """A file failed its integrity or signature check; the cache treats it as a miss."""


@dataclass(frozen=True)
class EntryHeader:
    """What the first line of every entry file says about the rest of it."""

    size: int
    digest: str
    algorithm: str  # "sha256" (integrity only) or "hmac-sha256" (signed)
    key_id: str | None
    host: str
    created: float
    task: str | None

    def to_line(self) -> bytes:
        return MAGIC + json.dumps(self.__dict__, sort_keys=True, separators=(",", ":")).encode() + b"\n"

    @classmethod
    def from_line(cls, line: bytes) -> EntryHeader:
        if not line.startswith(MAGIC) or not line.endswith(b"\n"):
            raise EntryRefused("no juicecache header (not written by juicecache, or truncated)")
        try:
            return cls(**json.loads(line[len(MAGIC):]))
        except (ValueError, TypeError) as exc:
            raise EntryRefused(f"unreadable header ({exc})") from None


@dataclass(frozen=True)
class Signer:
    """Digests bound to a file's name: content cannot be moved to another entry unnoticed."""

    key: bytes = b""

    @property
    def algorithm(self) -> str:
        return "hmac-sha256" if self.key else "sha256"

    @property
    def key_id(self) -> str | None:
        return hashlib.sha256(b"juicecache-key-id:" + self.key).hexdigest()[:12] if self.key else None

    def digest(self, name: str, content: bytes) -> str:
        label = f"{name}\n".encode()
        if self.key:
            mac = hmac.new(self.key, label, hashlib.sha256)
        else:
            mac = hashlib.sha256(label)
        mac.update(content)
        return mac.hexdigest()

    def check(self, name: str, header: EntryHeader, content: bytes) -> None:
        if len(content) != header.size:
            raise EntryRefused(f"truncated: {len(content)} of {header.size} bytes")
        if self.key and header.algorithm != self.algorithm:
            raise EntryRefused("not signed, and JUICECACHE_SIGNING_KEY is set")
        if self.key and header.key_id != self.key_id:
            raise EntryRefused(f"signed with another key (key id {header.key_id})")
        if not self.key and header.algorithm != self.algorithm:
            raise EntryRefused("signed, but JUICECACHE_SIGNING_KEY is not set here")
        if not hmac.compare_digest(self.digest(name, content), header.digest):
            raise EntryRefused("signature mismatch" if self.key else "checksum mismatch")


def make_folders(path: Path) -> None:
    """`mkdir -p` giving every level 0755 (`Path.mkdir` gives parents 0777 less the umask):
    under any umask, no folder of the cache is world-writable (see "Reliability" in README.md)."""
    missing = []
    while not path.is_dir():
        missing.append(path)
        path = path.parent
    for folder in reversed(missing):
        try:
            os.mkdir(folder, 0o755)
        except FileExistsError:
            pass


def write_atomically(path: Path, chunks: list[bytes]) -> None:
    """Write to a temporary file beside `path`, fsync, then rename over it."""
    make_folders(path.parent)
    temp = path.with_name(f"{TEMP_PREFIX}{path.name}.{socket.gethostname()}.{os.getpid()}.{secrets.token_hex(4)}")
    try:
        # 0644 whatever the umask: an entry others could rewrite would be a way in for them.
        with os.fdopen(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644), "wb") as handle:
            for chunk in chunks:
                handle.write(chunk)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def read_header(path: Path) -> EntryHeader:
    """Only the header: what `cache ls` needs, without reading the payload."""
    with open(path, "rb") as handle:
        return EntryHeader.from_line(handle.readline(MAX_HEADER))


@dataclass(frozen=True)
class StoreConfig:
    """Where the store lives and how it checks entries, resolved when first needed."""

    root: Path
    signer: Signer
    on_refused: Callable[[Path, str], None] | None = None


class EntryStorage(WritableFileSystem):
    """A Prefect result storage whose files are atomic and checked (see the module docstring).

    Its configuration is resolved on first use, so a task can be declared at import
    time and still find the volume that is mounted when it runs.
    """

    _block_type_name: ClassVar[str] = "JuiceCache Entry Storage"
    _block_type_slug: ClassVar[str] = "juicecache-entry-storage"

    kind: str
    _config: Callable[[], StoreConfig] = PrivateAttr()

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

    @property
    def folder(self) -> Path:
        return self._config().root / self.kind

    def _resolve_path(self, path: str | None) -> Path:
        """Entries are flat files named by key.

        Prefect records the writer's absolute path in each record; another host mounts
        the volume elsewhere, so only the file name is trusted and it is re-rooted here.
        """
        if not path:
            return self.folder
        name = Path(path).name
        if name in ("", ".", "..") or name.startswith("."):
            raise ValueError(f"invalid cache entry name {path!r}")
        return self.folder / name

    def read_path(self, path: str, _sync: bool | None = None) -> bytes:
        target = self._resolve_path(path)
        with _reporting_io_errors(self.kind, target, "reading"), open(target, "rb") as handle:
            line = handle.readline(MAX_HEADER)
            try:
                header = EntryHeader.from_line(line)
                content = handle.read()
                self._config().signer.check(f"{self.kind}/{target.name}", header, content)
            except EntryRefused as refused:
                self._refuse(target, str(refused))
                raise
        return content

    def write_path(self, path: str, content: bytes, _sync: bool | None = None) -> str:
        target = self._resolve_path(path)
        signer = self._config().signer
        header = EntryHeader(
            size=len(content),
            digest=signer.digest(f"{self.kind}/{target.name}", content),
            algorithm=signer.algorithm,
            key_id=signer.key_id,
            host=socket.gethostname(),
            created=time.time(),
            task=_current_task_name(),
        )
        with _reporting_io_errors(self.kind, target, "writing"):
            write_atomically(target, [header.to_line(), content])
        return str(target)

    async def aread_path(self, path: str) -> bytes:
        return await anyio.to_thread.run_sync(self.read_path, path)

    async def awrite_path(self, path: str, content: bytes) -> str:
        return await anyio.to_thread.run_sync(self.write_path, path, content)

    def _refuse(self, path: Path, reason: str) -> None:
        on_refused = self._config().on_refused
        if on_refused is not None:
            on_refused(path, reason)
        else:
            logger.warning("cache entry %s refused (%s): recomputing", path, reason)


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


def _current_task_name() -> str | None:
    from prefect.context import TaskRunContext

    context = TaskRunContext.get()
    return context.task.name if context else None

