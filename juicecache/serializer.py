"""Result payloads as plain pickles, without the base64 wrapping of Prefect's default.

Prefect's `pickle` serializer base64-encodes its output, so that a result can sit inside
a JSON document. juicecache stores every payload in a file of its own (`data/KEY`), where
the encoding buys nothing and costs a lot: a third more bytes to store and move, and, in
the benchmark (`bench/`), most of the time of writing or reading a large result
(`base64.encodebytes` is a Python loop over 57-byte pieces, ~1.7 s of a 2.4 s 64 MiB write).

One thing Prefect does put inside a JSON document: a background task's parameters
(`task.delay(...)`, `task.apply_async(...)`). It stores them as one JSON result record,
serialized by the task's own result serializer (`prefect.task_worker.store_parameters`,
`ResultRecord.serialize`), and pydantic writes bytes into JSON as UTF-8 text, which a
pickle is not. So what `dumps` returns declares its own JSON form, base64 (`Pickled`):
a payload file gets the raw bytes, only a JSON record pays for the encoding, and `loads`
reads either.

Large buffers cost a copy each way in a pickle: into it when written, out of it when read.
Objects that hand their memory to pickle protocol 5 as a `PickleBuffer` (numpy arrays, and
pandas data through them) keep it out of the pickle instead: `dumps` returns the pickle and
those buffers as the parts of one payload (`Framed`), written one after another, and `loads`
builds the objects on the buffer the payload was read into, without a copy. A result that is
one large bytes object is written from itself, and a hit reads it straight into the object it
returns (`LargeBytes`, see `bytespickle`). A large bytes object inside another result stays in
the pickle; its copy out of the payload lands in huge pages (`_Unpickling`, `hugepages`).
"""

from __future__ import annotations

import base64
import binascii
import io
import pickle
import struct
from typing import Any, Literal

import cloudpickle
from prefect.serializers import Serializer
from pydantic_core import SchemaSerializer, core_schema

from juicecache import hugepages
from juicecache.bytespickle import PickledBytes

SERIALIZER_TYPE = "juicecache-pickle"
# Every pickle of protocol 2 or later starts with the PROTO opcode; base64 text never does.
PICKLE_START = pickle.PROTO
# A framed payload (`Framed`) starts with a byte that neither a pickle nor base64 text starts with.
FRAMED_START = b"\x00JCP5"
# The frame's table: the pickle's size and the number of buffers, then each buffer's size.
_TABLE = struct.Struct("<QQ")
_BUFFER_SIZE = struct.Struct("<Q")
# Buffers this large are kept out of the pickle, smaller ones copied in (no frame for them); a
# bytes result this large is written in parts (`LargeBytes`).
OUT_OF_BAND_BYTES = 1 << 20
# Each buffer starts this aligned within the payload (numpy's fastest paths want aligned data).
_ALIGNMENT = 64


def _as_base64(payload: Pickled | Framed) -> str:
    return base64.b64encode(b"".join(payload_parts(payload))).decode("ascii")


# pydantic asks an object it has no schema for (Prefect's record types its `result` as `Any`)
# for its `__pydantic_serializer__`, so the encoding happens exactly where JSON is written,
# whoever writes it.
_BASE64_IN_JSON = SchemaSerializer(
    core_schema.any_schema(serialization=core_schema.plain_serializer_function_ser_schema(_as_base64, when_used="json"))
)


class Pickled(bytearray):
    """A pickle as `dumps` returns it: raw bytes, and base64 text once inside a JSON document.

    A bytearray, not a bytes subclass: the pickler writes straight into it (`write`), where
    building a bytes subclass would copy every payload once more (0.15-0.5 s for 256 MiB on a
    busy 2-core machine). A large chunk grows it into huge pages (`hugepages.extend`).
    """

    __pydantic_serializer__ = _BASE64_IN_JSON

    def write(self, chunk: bytes | pickle.PickleBuffer) -> int:
        # pickle hands over a large bytes object, or an array's buffer (`PickleBuffer`), as it is.
        data = chunk.raw() if isinstance(chunk, pickle.PickleBuffer) else memoryview(chunk).cast("B")
        if data.nbytes >= hugepages.MALLOC_BYTES:
            hugepages.extend(self, data)
        else:
            self += data
        return data.nbytes


class Framed:
    """A pickle and its out-of-band buffers, as the parts of one payload, never joined: a frame
    (`FRAMED_START`, then the table of sizes), the pickle, then each buffer, aligned. Not
    bytes-like, so that nothing can take the frame alone for the whole payload: juicecache's
    storage writes the parts (`payload_parts`), and JSON gets them joined, in base64."""

    __pydantic_serializer__ = _BASE64_IN_JSON

    def __init__(self, stream: Pickled, buffers: list[memoryview]) -> None:
        table = _TABLE.pack(len(stream), len(buffers)) + b"".join(_BUFFER_SIZE.pack(b.nbytes) for b in buffers)
        self.parts: list[bytes | bytearray | memoryview] = [FRAMED_START + table, stream]
        end = len(self.parts[0]) + len(stream)
        for buffer in buffers:
            padding = -end % _ALIGNMENT
            self.parts += [bytes(padding), buffer]
            end += padding + buffer.nbytes

    def __len__(self) -> int:
        return sum(memoryview(part).nbytes for part in self.parts)


class LargeBytes(PickledBytes):
    """A result that is one large bytes object, as `dumps` returns it: the pickle in its parts
    (see `bytespickle`), and base64 text once inside a JSON document."""

    __pydantic_serializer__ = _BASE64_IN_JSON


def payload_parts(payload: Pickled | Framed | PickledBytes | bytes) -> list[bytes | bytearray | memoryview]:
    """What to write, one after another, for a payload `dumps` returned (or any bytes)."""
    return payload.parts if isinstance(payload, (Framed, PickledBytes)) else [payload]


class RawPickleSerializer(Serializer):
    """cloudpickle in, pickle out, nothing around it: what `cached_task` stores by default.

    Registered with Prefect under the type name "juicecache-pickle" (by subclassing), so any
    process that imports juicecache reads these entries; entries written with Prefect's own
    serializers stay readable too, as their records name their serializer.
    """

    type: Literal["juicecache-pickle"] = SERIALIZER_TYPE

    def dumps(self, obj: Any) -> bytes:
        if type(obj) is bytes and len(obj) >= OUT_OF_BAND_BYTES:
            return LargeBytes(obj)  # type: ignore[return-value]
        pickled, buffers = Pickled(), []

        def out_of_band(buffer: pickle.PickleBuffer) -> bool | None:
            """Keeps a large buffer out of the pickle (a false answer), in `buffers`; a small one goes in."""
            raw = buffer.raw()
            if raw.nbytes < OUT_OF_BAND_BYTES:
                return True
            buffers.append(raw)
            return None

        cloudpickle.Pickler(pickled, protocol=pickle.HIGHEST_PROTOCOL, buffer_callback=out_of_band).dump(obj)
        # Bytes-like, and JSON-safe (see `Pickled`); or in parts, for juicecache's storage (see `Framed`).
        return Framed(pickled, buffers) if buffers else pickled  # type: ignore[return-value]

    def loads(self, blob: bytes) -> Any:
        # Only ever given content whose digest or signature `EntryStorage` has checked: a payload
        # file's pickle, plain or framed, or the base64 text of either in a JSON record (task
        # parameters); or, read in its parts, the pickle of one bytes object: that object.
        if isinstance(blob, PickledBytes):
            return blob.value
        if blob[:1] not in (PICKLE_START, FRAMED_START[:1]):
            try:
                blob = base64.b64decode(blob, validate=True)
            except binascii.Error:
                raise ValueError("not a juicecache pickle: neither a pickle nor its base64 text") from None
        if blob[:len(FRAMED_START)] == FRAMED_START:
            return _unpickle(*_unframe(memoryview(blob)))
        return _unpickle(memoryview(blob), [])


def _unframe(payload: memoryview) -> tuple[memoryview, list[memoryview]]:
    """The pickle and the buffers in a framed payload, as views of it: writable ones, so that an
    array built on one is as writable as the one pickled (a read-only array pickles as such)."""
    if payload.readonly:
        payload = memoryview(bytearray(payload))  # base64 decoded, or bytes given: only small ones
    try:
        stream_size, count = _TABLE.unpack_from(payload, len(FRAMED_START))
        start = len(FRAMED_START) + _TABLE.size
        sizes = struct.unpack_from(f"<{count}Q", payload, start)
    except struct.error:
        raise ValueError("a framed pickle cut short in its table") from None
    start += count * _BUFFER_SIZE.size
    stream, end = payload[start:start + stream_size], start + stream_size
    buffers = []
    for size in sizes:
        end += -end % _ALIGNMENT
        buffers.append(payload[end:end + size])
        end += size
    if end != payload.nbytes:
        raise ValueError(f"a framed pickle of {payload.nbytes} bytes where its table says {end}")
    return stream, buffers


def _unpickle(stream: memoryview, buffers: list[memoryview]) -> Any:
    if stream.nbytes < hugepages.MALLOC_BYTES:
        return pickle.loads(stream, buffers=buffers)
    return pickle.Unpickler(io.BufferedReader(_Unpickling(stream)), buffers=buffers).load()


class _Unpickling(io.RawIOBase):
    """A large pickle in memory, read as a file. Reading from a file, `pickle` allocates each
    large bytes (or bytearray) it builds and has `readinto` fill it: the one moment its memory
    can be advised into huge pages before anything touches it (`hugepages.advise`). From
    memory, `pickle.loads` would copy into it at once, a page fault per 4 KiB."""

    def __init__(self, stream: memoryview) -> None:
        super().__init__()
        self._stream, self._at = stream, 0

    def readable(self) -> bool:
        return True

    def readinto(self, target: memoryview) -> int:
        count = min(len(target), self._stream.nbytes - self._at)
        with memoryview(target) as into:
            hugepages.advise(into[:count])
            into[:count] = self._stream[self._at:self._at + count]
        self._at += count
        return count
