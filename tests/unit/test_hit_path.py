"""The hit path on a temporary folder: a hit takes no lock, a miss does, and what a hit
checked is what it serves; entries written with the earlier digests stay readable."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

import pytest
from prefect import task
from prefect.cache_policies import INPUTS, CacheKeyFnPolicy
from prefect.context import TaskRunContext
from prefect.results import ResultRecord, ResultStore
from prefect.serializers import Serializer
from prefect.settings import PREFECT_TASKS_REFRESH_CACHE, temporary_settings

from juicecache.bytespickle import CLOSING, PickledBytes, opening
from juicecache.entryfile import (
    DATA,
    FIRST_READ_BYTES,
    INLINE_MAX_BYTES,
    MAGIC,
    MAX_HEADER,
    RECORDS,
    EntryHeader,
    EntryRefused,
    Signer,
    read_entry,
    write_atomically,
)
from juicecache.locking import FlockLockManager
from juicecache.serializer import RawPickleSerializer
from juicecache.storage import RESULTS, EntryStorage, StoreConfig
from juicecache.transactions import commit_with_task, release_after_failed_read

KEY = "task-" + "0" * 40
# Results that pickle to more than `INLINE_MAX_BYTES` get a payload file of their own.
LARGE = b"x" * (INLINE_MAX_BYTES + 1)


def _compute() -> None:
    """The body of `Volume.task` (never run)."""


class Volume:
    """One store on a folder, as `store.Store` assembles it, and a second process's lock manager."""

    def __init__(self, root: Path, lock_timeout: float = 0.2, serializer: Serializer | None = None) -> None:
        config = StoreConfig(root, Signer(), on_record_read=commit_with_task, on_read_failed=release_after_failed_read)
        self.records, self.data = (EntryStorage.create(kind, lambda: config) for kind in (RECORDS, DATA))
        self.locks = FlockLockManager(lambda: root / "locks", lambda: lock_timeout, committed=self.records.holds_hit)
        self.results = ResultStore(
            result_storage=self.data,
            metadata_storage=self.records,
            serializer=serializer or RawPickleSerializer(),
            lock_manager=self.locks,
            # Every read goes to the files, as in another process: none served from what this store wrote.
            cache_result_in_memory=False,
        )
        self.other_process = FlockLockManager(lambda: root / "locks", lambda: 0.2)
        # A task whose cache policy keeps its keys in this store, as `cached_task`'s does.
        self.task = task(cache_policy=CacheKeyFnPolicy(cache_key_fn=lambda *_: KEY).configure(key_storage=self.records))(_compute)

    def write(self, value: object, expiration: datetime | None = None, holder: str | None = None) -> None:
        """Store `value` as Prefect stores a task run's result: inside the run (`TaskRunContext`), the
        payload first, then the record (the fast layer runs no task: the context alone is set)."""
        with TaskRunContext.model_construct(task=self.task):
            self.results.write(key=KEY, obj=value, expiration=expiration, holder=holder)


@pytest.fixture
def volume(tmp_path: Path) -> Volume:
    return Volume(tmp_path)


def test_a_hit_needs_no_lock_even_while_another_process_holds_it(volume: Volume) -> None:
    volume.write({"value": 1})
    assert volume.other_process.acquire_lock(KEY, "refreshing", acquire_timeout=0)
    assert volume.locks.acquire_lock(KEY, "reader", acquire_timeout=0)  # no wait: the entry is committed
    assert volume.results.exists(KEY) and volume.results.read(KEY, holder="reader").result == {"value": 1}
    volume.locks.release_lock(KEY, "reader")
    volume.other_process.release_lock(KEY, "refreshing")


def test_a_miss_takes_the_lock(volume: Volume) -> None:
    assert volume.other_process.acquire_lock(KEY, "computing", acquire_timeout=0)
    assert not volume.locks.acquire_lock(KEY, "second", acquire_timeout=0.1)  # no entry: waits for the lock
    volume.other_process.release_lock(KEY, "computing")
    assert volume.locks.acquire_lock(KEY, "second", acquire_timeout=0)
    assert volume.other_process.is_locked(KEY)
    volume.locks.release_lock(KEY, "second")


@pytest.mark.parametrize("case", ["expired", "refresh", "tampered payload", "payload removed", "tampered inline payload"])
def test_what_is_no_hit_takes_the_lock(volume: Volume, tmp_path: Path, case: str) -> None:
    expiration = datetime.now(UTC) - timedelta(seconds=1) if case == "expired" else None
    volume.write(LARGE if case.startswith("payload") or case == "tampered payload" else {"value": 1}, expiration)
    tampered = {"tampered payload": tmp_path / DATA / KEY, "tampered inline payload": tmp_path / RECORDS / KEY}.get(case)
    if tampered is not None:
        tampered.write_bytes(tampered.read_bytes()[:-1] + b"X")
    if case == "payload removed":
        (tmp_path / DATA / KEY).unlink()
    assert volume.other_process.acquire_lock(KEY, "computing", acquire_timeout=0)
    with temporary_settings({PREFECT_TASKS_REFRESH_CACHE: case == "refresh"}):
        assert not volume.locks.acquire_lock(KEY, "second", acquire_timeout=0.1)
    volume.other_process.release_lock(KEY, "computing")


@pytest.mark.parametrize("value", [b"x" * (3 * MAX_HEADER), LARGE], ids=["inline", "payload file"])
def test_a_hit_serves_what_it_checked_if_gc_removes_the_entry_meanwhile(volume: Volume, tmp_path: Path, value: bytes) -> None:
    volume.write(value)
    assert volume.locks.acquire_lock(KEY, "reader")
    for kind in (RECORDS, DATA):
        (tmp_path / kind / KEY).unlink(missing_ok=True)  # what `cache gc` may do: it does not wait for hits
    assert volume.results.exists(KEY) and volume.results.read(KEY, holder="reader").result == value
    volume.locks.release_lock(KEY, "reader")


@pytest.mark.parametrize(
    ("value", "files"),
    [(b"s" * 100, {RECORDS}), (b"s" * (INLINE_MAX_BYTES - 100), {RECORDS}), (LARGE, {RECORDS, DATA})],
    ids=["small", "just under the limit", "over the limit"],
)
def test_a_small_payload_travels_inside_its_record(tmp_path: Path, value: bytes, files: set[str]) -> None:
    """One file to open per hit; a larger payload keeps a file of its own. Either is read by a new process."""
    Volume(tmp_path).write(value)
    assert {kind for kind in (RECORDS, DATA) if (tmp_path / kind / KEY).exists()} == files
    reader = Volume(tmp_path)
    assert reader.results.exists(KEY) and reader.results.read(KEY, holder="reader").result == value


def test_where_the_record_ends_and_its_payload_starts_is_signed(tmp_path: Path) -> None:
    """The header's `inline` is part of the digest: moved, the split is refused, never parsed."""
    Volume(tmp_path).write("small")
    path = tmp_path / RECORDS / KEY
    line, body = path.read_bytes().split(b"\n", 1)
    header = EntryHeader.from_line(line + b"\n")
    path.write_bytes(dataclasses.replace(header, inline=header.inline - 1).to_line() + body)
    reader = Volume(tmp_path)
    assert not reader.records.holds_hit(KEY)
    with pytest.raises(EntryRefused, match="checksum mismatch"):
        reader.records.read_path(KEY)


@pytest.mark.parametrize("keys", ["not kept", "kept in another store"])
def test_a_payload_whose_record_goes_elsewhere_is_written_as_a_file(tmp_path: Path, keys: str) -> None:
    """`shared_storage()` as the result storage of a task (or flow) whose keys are not this store's:
    Prefect writes a whole result record there, or the record into another store. Nothing waits
    for a record that never comes: the small payload is a file (the whole record one a new
    process reads back; a record in another store names a payload under its own folder)."""

    def stores() -> tuple[Volume, Volume, ResultStore]:
        volume, other = Volume(tmp_path / "volume"), Volume(tmp_path / "other")
        metadata = {"metadata_storage": other.records} if keys == "kept in another store" else {}
        return volume, other, ResultStore(result_storage=volume.data, serializer=RawPickleSerializer(), **metadata)

    volume, other, results = stores()
    policy = INPUTS if keys == "not kept" else CacheKeyFnPolicy(cache_key_fn=lambda *_: KEY).configure(key_storage=other.records)
    with TaskRunContext.model_construct(task=task(cache_policy=policy)(_compute)):
        results.write(key=KEY, obj="small")
    assert (tmp_path / "volume" / DATA / KEY).is_file()
    if keys == "not kept":
        assert stores()[2].read(KEY).result == "small"


def test_a_payload_file_left_from_a_larger_result_goes_when_the_key_is_rewritten_small(tmp_path: Path) -> None:
    volume = Volume(tmp_path)
    volume.write(LARGE)
    volume.write("small")
    assert not (tmp_path / DATA / KEY).exists()
    assert Volume(tmp_path).results.read(KEY, holder="reader").result == "small"


def test_a_record_that_carries_its_payload_is_refused_by_a_release_without_inline_payloads(tmp_path: Path) -> None:
    """Older readers know no `inline` header field: such a record is a miss for them, never a wrong value."""
    volume = Volume(tmp_path)
    volume.write("small")
    inline = json.loads((tmp_path / RECORDS / KEY).read_bytes().partition(b"\n")[0][len(MAGIC):])
    # The header as releases before `inline` parse it (`EntryHeader.from_line`: the fields they know).
    earlier = dataclasses.make_dataclass("EarlierHeader", [f.name for f in dataclasses.fields(EntryHeader) if f.name != "inline"])
    with pytest.raises(TypeError):
        earlier(**inline)
    volume.write(LARGE)  # ... and everything else is still read by them
    for kind in (RECORDS, DATA):
        earlier(**json.loads((tmp_path / kind / KEY).read_bytes().partition(b"\n")[0][len(MAGIC):]))


@pytest.mark.parametrize(("algorithm", "key"), [("sha256", b""), ("hmac-sha256", b"secret"), ("blake3", b""), ("blake3-keyed", b"secret")])
def test_entries_written_with_each_digest_are_read(tmp_path: Path, algorithm: str, key: bytes) -> None:
    """SHA-256 entries (written before BLAKE3 became the digest) stay readable."""
    signer = Signer(key)
    content = b"y" * 10_000
    digest = signer.digest(f"{DATA}/{KEY}", content, algorithm)
    header = EntryHeader(len(content), digest, algorithm, signer.key_id, "host", 1.0, "task")
    write_atomically(tmp_path / DATA / KEY, [header.to_line(), content])
    read, body, _ = read_entry(tmp_path / DATA / KEY)
    signer.check(f"{DATA}/{KEY}", read, body)
    assert body == content
    with pytest.raises(EntryRefused):
        Signer(b"" if key else b"secret").check(f"{DATA}/{KEY}", read, body)  # keyed and unkeyed never mix


@pytest.mark.parametrize("size", [10, MAX_HEADER - 200, MAX_HEADER * 4, FIRST_READ_BYTES - 200, FIRST_READ_BYTES * 3])
def test_a_longer_or_shorter_file_than_its_header_says_is_refused(tmp_path: Path, size: int) -> None:
    signer = Signer()
    content = b"z" * size
    line = EntryHeader(size, signer.digest("data/k", content), signer.algorithm, None, "host", 1.0, None).to_line()
    for name, body in (("exact", content), ("longer", content + b"!"), ("shorter", content[:-1])):
        write_atomically(tmp_path / name, [line, body])
        header, read, _ = read_entry(tmp_path / name)
        if name == "exact":
            signer.check("data/k", header, read)
            assert read == content
        else:
            with pytest.raises(EntryRefused):
                signer.check("data/k", header, read)


def test_a_large_result_reads_back_whole(volume: Volume) -> None:
    """Read straight into one buffer of its size (`entryfile.read_entry`), then unpickled (a
    bytes object inside another result: a bytes result alone is read as such, below)."""
    value = [os.urandom(9 << 20), "text"]
    volume.write(value)
    assert volume.locks.acquire_lock(KEY, "reader")
    assert volume.results.read(KEY, holder="reader").result == value
    volume.locks.release_lock(KEY, "reader")


def test_a_large_bytes_result_is_read_straight_into_the_bytes_a_hit_returns(volume: Volume) -> None:
    """Nothing to unpickle: the payload file's data is read into the bytes object the hit returns."""
    value = os.urandom(9 << 20)
    volume.write(value)
    assert volume.records.holds_hit(KEY)
    payload = volume.data.read_path(KEY)
    assert isinstance(payload, PickledBytes) and RawPickleSerializer().loads(payload) is payload.value
    assert payload.value == value


@pytest.mark.parametrize("change", ["a flipped bit in the data", "the file cut short", "other opcodes after the data"])
def test_a_large_payload_unlike_the_pickle_of_bytes_is_never_served_as_one(volume: Volume, tmp_path: Path, change: str) -> None:
    """Damage is refused (a miss); a checked pickle with other opcodes after the data (a tuple,
    here: any writer may store one) is unpickled as what it is, never taken for the data alone."""
    value = os.urandom(9 << 20)
    volume.write(value)
    path = tmp_path / DATA / KEY
    if change == "other opcodes after the data":
        volume.data.write_path(KEY, opening(len(value)) + value + pickle.TUPLE1 + pickle.STOP)
    else:
        whole = path.read_bytes()
        assert whole.endswith(value + CLOSING)
        path.write_bytes(whole[:-1000] + bytes([whole[-1000] ^ 1]) + whole[-999:] if "bit" in change else whole[:-1])
    reader = Volume(tmp_path)
    if change == "other opcodes after the data":
        assert reader.records.holds_hit(KEY) and reader.results.read(KEY).result == (value,)
    else:
        assert not reader.records.holds_hit(KEY)


class PlainPickle(Serializer):
    """A user's own serializer that writes plain pickles too: only juicecache's gets bytes in parts."""

    type: Literal["test-plain-pickle"] = "test-plain-pickle"

    def dumps(self, obj: object) -> bytes:
        return pickle.dumps(obj, protocol=5)

    def loads(self, blob: bytes) -> object:
        return pickle.loads(blob)


def test_a_large_bytes_result_of_another_serializer_is_given_to_it_as_read(tmp_path: Path) -> None:
    value = os.urandom(9 << 20)
    volume = Volume(tmp_path, serializer=PlainPickle())
    volume.write(value)
    assert volume.records.holds_hit(KEY) and volume.results.read(KEY).result == value


def test_a_large_bytes_result_reads_whole_as_one_json_record(volume: Volume) -> None:
    """What `state.result()` reads in a process that did not run the task (see `storage._whole_record`)."""
    value = os.urandom(9 << 20)
    volume.write(value)
    results = EntryStorage.create(RESULTS, volume.records.config)
    assert ResultRecord.deserialize(results.read_path(KEY)).result == value


def test_a_payload_checked_for_a_record_since_replaced_is_read_again(tmp_path: Path) -> None:
    """An expired entry's payload is checked along with its record, and never taken (Prefect
    computes instead); the entry another process stores next must not be served with it."""
    here, elsewhere = Volume(tmp_path), Volume(tmp_path)
    here.write("old", datetime.now(UTC) - timedelta(seconds=1))
    assert not here.results.exists(KEY)
    elsewhere.write("new")
    assert here.results.exists(KEY) and here.results.read(KEY, holder="reader").result == "new"


def _store_while_waiting(elsewhere: Volume, value: object) -> threading.Thread:
    """Another process computing the key: it holds the lock, stores `value` in 0.3 s, lets go."""
    assert elsewhere.locks.acquire_lock(KEY, "computing", acquire_timeout=0)

    def compute() -> None:
        time.sleep(0.3)
        elsewhere.write(value, holder="computing")
        elsewhere.locks.release_lock(KEY, "computing")

    thread = threading.Thread(target=compute)
    thread.start()
    return thread


def test_a_run_that_waited_for_the_lock_finds_what_was_stored_meanwhile(tmp_path: Path) -> None:
    """A hit whose second read Prefect served from its own memory left a read unmade; a later
    run of the key in this process must not be served that record, since expired, without looking."""
    here, elsewhere = Volume(tmp_path, lock_timeout=10), Volume(tmp_path)
    here.write("old", datetime.now(UTC) + timedelta(seconds=1.2))
    assert here.locks.acquire_lock(KEY, "hit") and here.results.exists(KEY)
    here.locks.release_lock(KEY, "hit")
    time.sleep(1.3)
    computing = _store_while_waiting(elsewhere, "new")
    assert here.locks.acquire_lock(KEY, "waiter")  # expired: no hit, so it waits for the lock
    computing.join()
    assert here.results.exists(KEY) and here.results.read(KEY, holder="waiter").result == "new"
    here.locks.release_lock(KEY, "waiter")


def test_a_hit_that_cannot_be_read_lets_go_of_the_lock(tmp_path: Path) -> None:
    """Prefect's rollback skips a transaction that found its entry: a failed read must release the lock itself."""
    from prefect.transactions import IsolationLevel, transaction

    here, elsewhere = Volume(tmp_path, lock_timeout=10), Volume(tmp_path)
    computing = _store_while_waiting(elsewhere, "value")
    with pytest.raises(FileNotFoundError), transaction(key=KEY, store=here.results, isolation_level=IsolationLevel.SERIALIZABLE) as txn:
        assert txn.is_committed()  # found under the lock, after waiting for it
        computing.join()
        (tmp_path / RECORDS / KEY).unlink()  # the read fails (a volume error, in life)
        txn.read()
    assert elsewhere.other_process.acquire_lock(KEY, "next", acquire_timeout=0)
