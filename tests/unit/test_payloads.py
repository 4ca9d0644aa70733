"""Result payloads: plain pickles, framed ones whose large buffers stay out of the pickle
(`serializer.Framed`), written in parts and unpickled on the buffer read, without a copy, and a
large bytes result written from itself (`bytespickle`)."""

from __future__ import annotations

import base64
import json
import os
import pickle
from pathlib import Path

import cloudpickle
import numpy as np
import pytest
from prefect.serializers import JSONSerializer
from pydantic import BaseModel

from juicecache import bytespickle, hugepages
from juicecache.entryfile import DATA, EntryRefused, Signer
from juicecache.serializer import FRAMED_START, OUT_OF_BAND_BYTES, Framed, LargeBytes, Pickled, RawPickleSerializer
from juicecache.storage import EntryStorage, StoreConfig

KEY = "task-" + "0" * 40
SERIALIZER = RawPickleSerializer()
# Large enough to be read into a buffer of its own (`hugepages.allocate`) and framed.
ARRAY = np.arange(hugepages.OWN_BUFFER_BYTES // 8 + 1000, dtype=np.float64)


class Record(BaseModel):
    """Prefect's result record as far as JSON goes: the result typed `Any`."""

    result: object


def data_storage(root: Path, key: bytes = b"") -> EntryStorage:
    config = StoreConfig(root, Signer(key))
    return EntryStorage.create(DATA, lambda: config)


def stored(root: Path, value: object) -> object:
    """`value` as a hit returns it: written, read back (checked), unpickled."""
    data = data_storage(root)
    data.write_path(KEY, SERIALIZER.dumps(value))
    return SERIALIZER.loads(data.read_path(KEY))


def test_a_large_array_is_framed_and_unpickled_on_the_buffer_read(tmp_path: Path) -> None:
    value = {"array": ARRAY, "small": np.arange(5), "text": "t"}
    assert isinstance(SERIALIZER.dumps(value), Framed)
    data = data_storage(tmp_path)
    data.write_path(KEY, SERIALIZER.dumps(value))
    buffer = data.read_path(KEY)
    assert isinstance(buffer, hugepages.HugeBuffer) and buffer[:len(FRAMED_START)] == FRAMED_START
    loaded = SERIALIZER.loads(buffer)
    assert np.array_equal(loaded["array"], ARRAY) and loaded["small"].tolist() == [0, 1, 2, 3, 4] and loaded["text"] == "t"
    array = loaded["array"]
    assert np.shares_memory(array, np.frombuffer(buffer, np.uint8))  # no copy: a view of the buffer the file was read into
    assert array.flags.writeable and array.ctypes.data % 64 == 0
    del buffer, loaded
    array[0] = -1  # the buffer lives as long as the array
    assert array[0] == -1 and array[1] == 1


def test_a_read_only_array_comes_back_read_only(tmp_path: Path) -> None:
    frozen = ARRAY.copy()
    frozen.flags.writeable = False
    loaded = stored(tmp_path, frozen)
    assert np.array_equal(loaded, frozen) and not loaded.flags.writeable


def test_fortran_order_and_other_dtypes_round_trip(tmp_path: Path) -> None:
    value = [np.asfortranarray(np.arange(600_000, dtype=np.int32).reshape(1000, 600)), np.ones(300_000, dtype=np.complex64)]
    loaded = stored(tmp_path, value)
    assert loaded[0].flags.f_contiguous and np.array_equal(loaded[0], value[0]) and np.array_equal(loaded[1], value[1])


def test_smaller_buffers_stay_in_a_plain_pickle(tmp_path: Path) -> None:
    """Under `OUT_OF_BAND_BYTES` an array is copied into the pickle: no frame, as before. Above
    64 KiB pickle hands the pickle its buffer as such, which `Pickled.write` takes too."""
    array = np.arange(OUT_OF_BAND_BYTES // 8 - 1000, dtype=np.float64)
    pickled = SERIALIZER.dumps(array)
    assert isinstance(pickled, Pickled) and pickled[:1] == pickle.PROTO
    assert np.array_equal(stored(tmp_path, array), array)


def test_plain_pickles_written_before_frames_still_load(tmp_path: Path) -> None:
    value = {"array": ARRAY, "bytes": b"b" * 100}
    for protocol in (2, 4, 5):
        plain = cloudpickle.dumps(value, protocol=protocol)
        for blob in (plain, base64.b64encode(plain)):
            loaded = SERIALIZER.loads(blob)
            assert np.array_equal(loaded["array"], ARRAY) and loaded["bytes"] == value["bytes"]


def test_large_bytes_stay_in_the_pickle_and_load_whole(tmp_path: Path) -> None:
    """Above `MALLOC_BYTES` the pickle grows into huge pages (`hugepages.extend`) and is unpickled
    from a file (`_Unpickling`): both must give the very bytes, and the pickle pickle itself writes."""
    value = os.urandom(hugepages.MALLOC_BYTES + 12345)
    pickled = SERIALIZER.dumps([value, b"after"])
    assert isinstance(pickled, Pickled) and pickled == cloudpickle.dumps([value, b"after"], protocol=5)
    loaded = stored(tmp_path, [value, b"after"])
    assert type(loaded[0]) is bytes and loaded[0] == value and loaded[1] == b"after"
    assert SERIALIZER.loads(pickle.dumps(value, protocol=2)) == value  # text opcodes: lines read from the file


def test_a_large_bytes_result_is_written_from_itself_as_the_pickle_pickle_writes(tmp_path: Path) -> None:
    """No copy into a pickle; and the file is the very pickle `pickle` writes, which any reader
    (an older release too) unpickles to the same bytes. Smaller bytes, and bytes subclasses, pickle as before."""
    value = os.urandom(OUT_OF_BAND_BYTES)
    payload = SERIALIZER.dumps(value)
    assert isinstance(payload, LargeBytes) and payload.parts[1] is value
    assert b"".join(payload.parts) == pickle.dumps(value, protocol=5) == cloudpickle.dumps(value, protocol=5)
    data_storage(tmp_path).write_path(KEY, payload)
    written = (tmp_path / DATA / KEY).read_bytes()
    assert pickle.loads(written[written.index(b"\n") + 1:]) == value
    assert isinstance(SERIALIZER.dumps(value[:-1]), Pickled)
    assert isinstance(SERIALIZER.dumps(bytearray(value)), Pickled) and isinstance(SERIALIZER.dumps(Bytes(value)), Pickled)


class Bytes(bytes):
    """A bytes subclass: pickled by reference to its class, never as plain bytes."""


def test_only_the_layout_of_one_bytes_object_is_taken_for_one() -> None:
    head = bytespickle.opening(100) + b"d" * 100
    assert bytespickle.data_offset(head, 100 + 9) == 7
    assert bytespickle.data_offset(head, 100 + 10) is None  # the data and its closing do not end the content
    assert bytespickle.data_offset(head[:5], 100 + 9) is None  # cut short in its length
    assert bytespickle.data_offset(pickle.dumps(b"d" * 100, protocol=5), 100 + 9) is None  # small: in a frame
    assert bytespickle.data_offset(pickle.dumps([b"d" * 100_000], protocol=5), 100_000 + 9) is None
    huge = bytespickle.opening(1 << 32)
    assert huge[2:3] == pickle.BINBYTES8 and bytespickle.data_offset(huge, len(huge) + (1 << 32) + 2) == len(huge)


@pytest.mark.parametrize("damage", ["a flipped bit in a buffer", "a buffer cut short", "the frame alone"])
def test_a_damaged_framed_payload_is_refused_before_it_is_unpickled(tmp_path: Path, damage: str) -> None:
    data = data_storage(tmp_path, b"secret")
    data.write_path(KEY, SERIALIZER.dumps(ARRAY))
    path = tmp_path / DATA / KEY
    whole = path.read_bytes()
    if damage == "a flipped bit in a buffer":
        path.write_bytes(whole[:-100] + bytes([whole[-100] ^ 1]) + whole[-99:])
    elif damage == "a buffer cut short":
        path.write_bytes(whole[:-8])
    else:
        path.write_bytes(whole[:whole.index(b"\n") + 1 + 200])
    with pytest.raises(EntryRefused, match="signature mismatch|truncated"):
        data.read_path(KEY)  # what Prefect would unpickle is never returned


@pytest.mark.parametrize("cut", [8, 20, 40, -1])
def test_a_framed_payload_unlike_its_table_is_no_pickle(cut: int) -> None:
    """Checked content that still disagrees with its own table (never written by `dumps`) is
    refused as a whole, never unpickled in part."""
    whole = b"".join(SERIALIZER.dumps(ARRAY).parts)
    with pytest.raises(ValueError, match="framed pickle"):
        SERIALIZER.loads(bytearray(whole[:cut]))


def test_parameters_in_a_json_record_are_base64_and_load(tmp_path: Path) -> None:
    """A background run's parameters go inside a JSON record (see the serializer's docstring)."""
    for value in ({"array": ARRAY, "n": 1}, {"n": 2}):
        text = json.loads(Record(result=SERIALIZER.dumps(value)).model_dump_json())["result"]
        loaded = SERIALIZER.loads(text.encode())
        assert loaded["n"] == value["n"]
        if "array" in value:
            assert np.array_equal(loaded["array"], ARRAY) and loaded["array"].flags.writeable
    large = os.urandom(OUT_OF_BAND_BYTES)
    text = json.loads(Record(result=SERIALIZER.dumps(large)).model_dump_json())["result"]
    assert SERIALIZER.loads(text.encode()) == large


def test_a_large_payload_of_another_serializer_decodes(tmp_path: Path) -> None:
    """Prefect's JSON serializer decodes the payload it is given, a buffer of its own when large."""
    value = ["x" * 1000] * (hugepages.OWN_BUFFER_BYTES // 1000)
    data = data_storage(tmp_path)
    data.write_path(KEY, JSONSerializer().dumps(value))
    buffer = data.read_path(KEY)
    assert isinstance(buffer, hugepages.HugeBuffer) and JSONSerializer().loads(buffer) == value
