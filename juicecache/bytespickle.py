"""The pickle of one large bytes object, held in three parts: the opcodes before its data, the
data (the bytes object itself), the opcodes after.

A result that is one large bytes object (a file's content, an image, a Parquet file) pickles to
its data with a few bytes around it (protocol 5: PROTO, BINBYTES and the length; MEMOIZE, STOP).
Pickling copies the data into the pickle, and unpickling copies it out into a new bytes object:
for 256 MiB, ~100 ms each on the benchmark's machine, a third of a hit. In parts, a write takes
the data from the object itself, and a hit reads it straight into the object it returns
(`entryfile.read_entry`, `hugepages.new_bytes`). The parts joined are exactly what `pickle.dumps`
writes, so such an entry is an ordinary pickle to any reader, this release's or an older one.

Kept apart from `serializer` (which imports Prefect) for the entry file reader (see `entryfile`).
"""

from __future__ import annotations

import pickle
import struct

_PROTOCOL_5 = pickle.PROTO + bytes([5])
# BINBYTES takes a 4-byte length; BINBYTES8, for 4 GiB and more, an 8-byte one.
_LENGTHS = {pickle.BINBYTES: struct.Struct("<I"), pickle.BINBYTES8: struct.Struct("<Q")}
CLOSING = pickle.MEMOIZE + pickle.STOP
OPENING_MAX_BYTES = len(_PROTOCOL_5) + 1 + 8


def opening(size: int) -> bytes:
    """What `pickle.dumps(data, protocol=5)` writes before the data of a large bytes object of `size` bytes."""
    opcode = pickle.BINBYTES if size < 1 << 32 else pickle.BINBYTES8
    return _PROTOCOL_5 + opcode + _LENGTHS[opcode].pack(size)


def data_offset(start: bytes, size: int) -> int | None:
    """Where the data starts in a content of `size` bytes that starts with `start` (at least
    `OPENING_MAX_BYTES` of it), if it is laid out as the pickle of one bytes object; else None.
    Its last bytes are not known yet: a reader checks that they are `CLOSING`."""
    length = _LENGTHS.get(start[len(_PROTOCOL_5):len(_PROTOCOL_5) + 1])
    if not start.startswith(_PROTOCOL_5) or length is None:
        return None
    offset = len(_PROTOCOL_5) + 1 + length.size
    if len(start) < offset:
        return None
    declared = length.unpack_from(start, offset - length.size)[0]
    return offset if offset + declared + len(CLOSING) == size else None


class PickledBytes:
    """A bytes object (`value`) and the pickle it makes, as the parts to write or hash one after
    another, never joined (not bytes-like, so that nothing takes one part for the whole)."""

    def __init__(self, value: bytes, start: bytes | None = None) -> None:
        """`start`: the opcodes as read before the data (default: what `pickle` writes, `opening`)."""
        self.value = value
        self.parts = [start or opening(len(value)), value, CLOSING]

    def __len__(self) -> int:
        return sum(map(len, self.parts))
