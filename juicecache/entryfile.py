"""The entry file format: a checked header line, then the content; written atomically.

Kept apart from `storage` (the Prefect block) so that the cache admin commands, which
only read headers and remove files, start without importing Prefect.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import os
import re
import secrets
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path

import blake3

from juicecache.bytespickle import CLOSING, PickledBytes, data_offset
from juicecache.hugepages import OWN_BUFFER_BYTES, HugeBuffer, allocate, new_bytes

MAGIC = b"JCE1 "
# The id Prefect records as `storage_block_id` in every state it stores through juicecache
# (see `storage.EntryStorage.create`): how `cache report` tells juicecache's task runs apart.
BLOCK_ID = uuid.uuid5(uuid.NAMESPACE_URL, "juicecache:entry-storage")
# The storage block's type, and the one document of it each Prefect server keeps (see
# `store.register_results_block`): named here, where `cache report` reads them without Prefect.
BLOCK_TYPE_SLUG = "juicecache-entry-storage"
RESULTS_BLOCK = "juicecache-results"
RECORDS = "records"
DATA = "data"
LOCKS = "locks"
# Background runs' parameters (`task.delay(...)`, see `storage.parameters_name`), beside the entries.
PARAMETERS = "parameters"
TEMP_PREFIX = ".tmp-"
# Cap the header so a garbage file without a newline is refused without reading it all.
MAX_HEADER = 4096
# Payloads up to this size travel inside their record (see `EntryHeader.inline`); with Prefect's
# metadata, the record stays under `listing.MAX_RECORD_BYTES`.
INLINE_MAX_BYTES = 32 * 1024
# The first read of an entry file: the header and, for a record, all of it, payload inline included.
FIRST_READ_BYTES = 64 * 1024
# Entries are named by cache key: the task's name (up to 40 characters), then 40 hex digits
# of a SHA-256 (see `cache.namespaced_key`). Prefect also stores the result of a failed run,
# or of a call whose key function returned None, beside them under a random name: never a hit.
KEY_PREFIX_CHARS = KEY_DIGEST_CHARS = 40
CACHE_KEY = re.compile(rf"[a-z0-9-]{{1,{KEY_PREFIX_CHARS}}}-[0-9a-f]{{{KEY_DIGEST_CHARS}}}")


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
    code: str | None = None  # the short digest of the task's code (`code_version`), if keyed on it
    seconds: float | None = None  # how long the task run took to compute it: what each hit saves
    # A record only: its content ends with its payload, this many bytes (a small result), so a hit
    # opens one file instead of two. Written only when set: such a record is refused (a miss) by
    # releases from before it, which know no `inline`; every other entry stays readable by them.
    inline: int | None = None

    def to_line(self) -> bytes:
        fields = {name: value for name, value in self.__dict__.items() if name != "inline" or value is not None}
        return MAGIC + json.dumps(fields, sort_keys=True, separators=(",", ":")).encode() + b"\n"

    def split(self, content: bytes) -> tuple[bytes, bytes | None]:
        """A record's checked content as Prefect's metadata and the payload it carries (None: in `data/`)."""
        if self.inline is None:
            return content, None
        if not 0 <= self.inline <= len(content):
            raise EntryRefused(f"carries {self.inline} payload bytes in {len(content)}")
        cut = len(content) - self.inline
        return content[:cut], content[cut:]

    @classmethod
    def from_line(cls, line: bytes) -> EntryHeader:
        if not line.startswith(MAGIC) or not line.endswith(b"\n"):
            raise EntryRefused("no juicecache header (not written by juicecache, or truncated)")
        try:
            return cls(**json.loads(line[len(MAGIC):]))
        except (ValueError, TypeError) as exc:
            raise EntryRefused(f"unreadable header ({exc})") from None


# Digests new entries get, then those of entries written before BLAKE3 (still read and checked):
# BLAKE3 hashes about 3-4x faster than SHA-256 on the benchmark's machine (bench/results.md), which
# a large hit pays in full. Its keyed mode is a MAC, as HMAC-SHA256 is.
UNKEYED = ("blake3", "sha256")
KEYED = ("blake3-keyed", "hmac-sha256")
# Above this size BLAKE3 hashes on all cores.
_PARALLEL_HASH_BYTES = 1 << 20
# What an entry's content is held in: read (`read_entry`), or about to be written.
Content = bytes | bytearray | memoryview | HugeBuffer
# What `read_entry` gives: the content in one buffer, or the pickle of one bytes object in its parts.
ReadContent = bytearray | HugeBuffer | PickledBytes


def _size(content: Content) -> int:
    return memoryview(content).nbytes


@dataclass(frozen=True)
class Signer:
    """Digests bound to a file's name: content cannot be moved to another entry unnoticed."""

    key: bytes = b""

    @property
    def algorithm(self) -> str:
        return KEYED[0] if self.key else UNKEYED[0]

    @property
    def key_id(self) -> str | None:
        return hashlib.sha256(b"juicecache-key-id:" + self.key).hexdigest()[:12] if self.key else None

    @functools.cached_property
    def _blake3_key(self) -> bytes:
        """BLAKE3 takes a 32-byte key: derived from the signing key, in BLAKE3's own key derivation mode."""
        return blake3.blake3(self.key, derive_key_context="juicecache entry signing key v1").digest()

    def digest(
        self, name: str, content: Content | list[Content], algorithm: str | None = None, inline: int | None = None
    ) -> str:
        """The digest of `content` stored as entry `name`, with `algorithm` (default: what new entries get).

        A content in parts (a pickle and its buffers, see `serializer.Framed`) is hashed part by
        part. A record carrying its payload binds the payload's length (`inline`) too: where the
        record ends and the payload starts is part of what is signed.
        """
        label = (f"{name}\n" if inline is None else f"{name}\ninline {inline}\n").encode()
        algorithm = algorithm or self.algorithm
        parts = content if isinstance(content, list) else [content]
        if algorithm.startswith("blake3"):
            threads = blake3.blake3.AUTO if sum(map(_size, parts)) > _PARALLEL_HASH_BYTES else 1
            keyed = {"key": self._blake3_key} if algorithm == "blake3-keyed" else {}
            digest = blake3.blake3(label, max_threads=threads, **keyed)
        else:
            digest = hmac.new(self.key, label, hashlib.sha256) if algorithm == "hmac-sha256" else hashlib.sha256(label)
        for part in parts:
            digest.update(part)
        return digest.hexdigest()

    def check(self, name: str, header: EntryHeader, content: Content | PickledBytes) -> None:
        if len(content) != header.size:
            what = "truncated" if len(content) < header.size else "longer than its header says"
            raise EntryRefused(f"{what}: {len(content)} of {header.size} bytes")
        self.check_header(header)
        parts = content.parts if isinstance(content, PickledBytes) else content
        self._compare(header, self.digest(name, parts, header.algorithm, header.inline))

    def check_header(self, header: EntryHeader) -> None:
        """What the header alone can refuse: no signature, or one made with another key."""
        if self.key and header.algorithm not in KEYED:
            raise EntryRefused("not signed, and JUICECACHE_SIGNING_KEY is set")
        if self.key and header.key_id != self.key_id:
            raise EntryRefused(f"signed with another key (key id {header.key_id})")
        if not self.key and header.algorithm not in UNKEYED:
            raise EntryRefused("signed, but JUICECACHE_SIGNING_KEY is not set here")

    def _compare(self, header: EntryHeader, digest: str) -> None:
        if not hmac.compare_digest(digest, header.digest):
            raise EntryRefused("signature mismatch" if self.key else "checksum mismatch")


def makedirs_0755(path: Path) -> None:
    """`mkdir -p` giving every level 0755 (`Path.mkdir` gives parents 0777 less the umask):
    under any umask, no folder of the cache is world-writable (see docs/security.md)."""
    missing = []
    while not path.is_dir():
        missing.append(path)
        path = path.parent
    for folder in reversed(missing):
        try:
            os.mkdir(folder, 0o755)
        except FileExistsError:
            pass


def write_atomically(path: Path, chunks: list[Content]) -> int:
    """Write to a temporary file beside `path`, fsync, then rename over it. Returns its inode."""
    makedirs_0755(path.parent)
    temp = path.with_name(f"{TEMP_PREFIX}{path.name}.{socket.gethostname()}.{os.getpid()}.{secrets.token_hex(4)}")
    try:
        # 0644 whatever the umask: an entry others could rewrite would be a way in for them.
        with os.fdopen(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644), "wb") as handle:
            for chunk in chunks:
                handle.write(chunk)
            handle.flush()
            os.fsync(handle.fileno())
            inode = os.fstat(handle.fileno()).st_ino
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return inode


def read_entry(path: Path, bytes_pickle: bool = False) -> tuple[EntryHeader, ReadContent, os.stat_result]:
    """An entry file's header, its content (not yet checked: see `Signer.check`) and its status.

    Read with as few operations on the mount as a file allows. Its status comes right after
    the open, from the kernel's cache (the lookup just brought it). Never a byte is asked
    beyond the size it gives: a read past the end makes the kernel ask the mount for the
    file's attributes again, in case it grew. The first read holds the header and, for a
    small entry, all of it; a large content goes straight into a buffer of its size.

    `bytes_pickle`: a large content laid out as the pickle of one bytes object (see
    `bytespickle`) is read straight into that object, and comes back as a `PickledBytes`.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        status = os.fstat(fd)
        head = os.pread(fd, min(FIRST_READ_BYTES, status.st_size), 0)
        end = head.find(b"\n", 0, MAX_HEADER) + 1
        header = EntryHeader.from_line(head[:end] if end else head[:MAX_HEADER])
        size = status.st_size - end
        if len(head) < FIRST_READ_BYTES:
            content = bytearray(head[end:])
        else:
            start = data_offset(head[end:], size) if bytes_pickle else None
            content = _read_from(fd, end, size) if start is None else _read_bytes_pickle(fd, end, head[end:end + start], size)
    finally:
        os.close(fd)
    return header, content, status


def _read_from(fd: int, offset: int, size: int) -> bytearray | HugeBuffer:
    """Up to `size` bytes of `fd` from `offset` (fewer if it is shorter), into one buffer: a
    large one in huge pages (see `hugepages`), where a bytearray would cost a page fault per 4 KiB."""
    content = allocate(size) if size >= OWN_BUFFER_BYTES else bytearray(size)
    with memoryview(content) as view:
        done = _fill(fd, view, offset)
    # Shorter than its header said: it is refused, and a short copy will do.
    return content if done == size else bytearray(content[:done])


def _read_bytes_pickle(fd: int, offset: int, start: bytes, size: int) -> ReadContent:
    """The `size` bytes of `fd` from `offset`, the pickle of one bytes object whose data follows
    `start`: the data read into a new bytes object, the rest checked to be `CLOSING`. Any other
    content (a shorter file, or other opcodes after the data) is read as it is, into one buffer."""
    value, view = new_bytes(size - len(start) - len(CLOSING))
    with view:
        done = _fill(fd, view, offset + len(start))
    if done == len(value) and os.pread(fd, len(CLOSING), offset + len(start) + done) == CLOSING:
        return PickledBytes(value, start)
    return _read_from(fd, offset, size)


def _fill(fd: int, view: memoryview, offset: int) -> int:
    """Read `fd` from `offset` into `view` until it is full or the file ends; the bytes read."""
    done = 0
    while done < view.nbytes:
        count = os.preadv(fd, [view[done:]], offset + done)
        if count == 0:
            break
        done += count
    return done


def read_header(path: Path) -> EntryHeader:
    """Only the header: what `cache ls` needs, without reading the payload."""
    with open(path, "rb") as handle:
        return EntryHeader.from_line(handle.readline(MAX_HEADER))
