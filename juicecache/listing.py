"""The listing index and the writers' journal: what a scan already knows about each record.

Writers append each record they write to their host's journal (`note_record`); a scan
folds the journals into the index and then opens only the records neither has seen (see
`ListingIndex`). No cache lookup reads either. `note_record` runs on Prefect's write path,
so this module imports nothing beyond the standard library and `entryfile`.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from juicecache.entryfile import DATA, RECORDS, TEMP_PREFIX, EntryHeader, EntryRefused, makedirs_0755, write_atomically

# Temporary files untouched this long belong to a writer that died (a live one keeps writing).
STALE_TEMPORARY_SECONDS = 3600.0
# Records are small; anything larger is not one of ours and is not read whole.
MAX_RECORD_BYTES = 1 << 16
INDEX = "index"
JOURNAL_PREFIX = "journal-"


@dataclass(frozen=True)
class RecordInfo:
    """What one record file says, remembered by the listing index under its inode."""

    inode: int
    size: int  # the record's own bytes, without a payload it carries
    task: str | None
    host: str | None
    created: float | None
    expires: float | None
    payload: str | None  # the payload's file in `data/`; None: the record carries it
    payload_bytes: int | None  # None: no payload when the record was read
    problem: str | None
    code: str | None = None  # last, with defaults: journals and indexes written before them still load
    seconds: float | None = None


class ListingIndex:
    """What earlier scans read, so a scan only opens records that are new since.

    Opening a file costs round trips to the metadata engine (most of a millisecond on a
    busy embedded volume), so reading 100,000 records takes a minute or more, while
    listing a folder yields every name with its inode at once. An entry is rewritten
    payload first, then record, each by rename, which gives the new file a new inode: a
    record whose inode matches the index is unchanged, and so is its payload. The index
    only speeds up listing: anything unreadable in it is ignored, and no cache lookup
    ever reads it.

    Writers add to it too, so that even the first scan of a large cache opens no record:
    each record written appends one line (what a scan would read from it, and its inode)
    to its host's journal, `index/journal-HOST` (see `note_record`). A scan folds the
    journals into the index and removes them. A line that is lost (two hosts with one
    name, a writer killed mid-line, a scan folding meanwhile) only means that record is
    read the usual way.
    """

    VERSION = 1

    def __init__(self, records: dict[str, RecordInfo]) -> None:
        self.records = records

    @staticmethod
    def path(root: Path) -> Path:
        return root / INDEX / "entries.json"

    @classmethod
    def load(cls, root: Path) -> ListingIndex:
        try:
            saved = json.loads(cls.path(root).read_bytes())
            if saved["version"] != cls.VERSION:
                raise ValueError("another version")
            return cls({name: RecordInfo(*fields) for name, fields in saved["records"].items()})
        except (OSError, ValueError, TypeError, KeyError):
            return cls({})

    def save(self, root: Path, folded: Iterable[Path] = ()) -> None:
        """Write the index, then remove the journals `fold_journals` took: their lines are in it now."""
        document = {"version": self.VERSION, "records": {name: list(info.__dict__.values()) for name, info in self.records.items()}}
        try:
            write_atomically(self.path(root), [json.dumps(document, separators=(",", ":")).encode()])
        except OSError:  # a read-only volume: the next scan just reads everything again
            pass
        for journal in folded:
            journal.unlink(missing_ok=True)  # another scan may have removed it first

    def fold_journals(self, root: Path) -> list[Path]:
        """Add the writers' journal lines; returns the journals, to remove once the index is saved.

        Each journal is first renamed aside, so that lines appended meanwhile go to a
        new journal instead of being removed unread.
        """
        taken = []
        folder = root / INDEX
        for journal in sorted(folder.glob(f"{JOURNAL_PREFIX}*")) + _stale(folder.glob(f"{TEMP_PREFIX}{JOURNAL_PREFIX}*")):
            aside = journal.with_name(f"{TEMP_PREFIX}{journal.name}.{os.getpid()}.{time.time_ns()}")
            try:
                os.rename(journal, aside)
                text = aside.read_text(errors="replace")
            except OSError:  # another scan took it first, or a read-only volume
                continue
            taken.append(aside)
            for line in text.splitlines():
                try:
                    name, fields = json.loads(line)
                    self.records[name] = RecordInfo(*fields)
                except (ValueError, TypeError):  # a torn line: that record is read instead
                    continue
        return taken


def note_record(root: Path, key: str, inode: int, raw: bytes) -> None:
    """Append a record just written (`raw`, its whole content) to this host's journal (see
    `ListingIndex`).

    Costs the writer one small append; any failure is ignored, since the journal only
    speeds up listing.
    """
    journal = root / INDEX / f"{JOURNAL_PREFIX}{socket.gethostname()}"
    try:
        info = _describe_record(root, key, inode, raw)
        line = json.dumps([key, list(info.__dict__.values())], separators=(",", ":")) + "\n"
        try:
            fd = os.open(journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except FileNotFoundError:
            makedirs_0755(journal.parent)
            fd = os.open(journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())  # one write: appends from one host's processes never interleave
        finally:
            os.close(fd)
    except OSError:
        pass


def read_record(root: Path, key: str, inode: int) -> RecordInfo | None:
    """What a scan keeps of the record `key` (listed with `inode`); None if it was removed since the listing."""
    try:
        fd = os.open(root / RECORDS / key, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        raw = os.read(fd, MAX_RECORD_BYTES)
    finally:
        os.close(fd)
    return _describe_record(root, key, inode, raw)


def _describe_record(root: Path, key: str, inode: int, raw: bytes) -> RecordInfo:
    """What a scan keeps of a record file (`raw`, its whole content) and of its payload's size."""
    task = host = problem = code = None
    created = expires = seconds = None
    payload, carried = key, None
    try:
        line, newline, body = raw.partition(b"\n")
        header = EntryHeader.from_line(line + newline)
        task, host, created, code, seconds = header.task, header.host, header.created, header.code, header.seconds
        if len(body) != header.size:
            raise EntryRefused(f"truncated record: {len(body)} of {header.size} bytes")
        body, carried = header.split(body)
        metadata = json.loads(body)
        expires = _timestamp(metadata.get("expiration"))
        payload = None if carried is not None else Path(metadata.get("storage_key") or key).name
    except (EntryRefused, ValueError, TypeError, AttributeError) as exc:
        problem = f"damaged record: {exc}"
    if carried is not None:
        return RecordInfo(inode, len(raw) - len(carried), task, host, created, expires, None, len(carried), problem, code, seconds)
    try:
        payload_bytes: int | None = os.stat(root / DATA / payload).st_size
    except (FileNotFoundError, ValueError):
        payload_bytes = None
    return RecordInfo(inode, len(raw), task, host, created, expires, payload, payload_bytes, problem, code, seconds)


def _timestamp(text: object) -> float | None:
    if text is None:
        return None
    if not isinstance(text, str):
        raise ValueError(f"expiration {text!r} is not a date")
    return datetime.fromisoformat(text).timestamp()


def _stale(paths: Iterable[Path]) -> list[Path]:
    """Journals set aside by a scan that died before removing them."""
    stale = []
    for path in paths:
        try:
            if time.time() - os.stat(path).st_mtime >= STALE_TEMPORARY_SECONDS:
                stale.append(path)
        except FileNotFoundError:
            continue
    return stale
