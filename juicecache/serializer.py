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
"""

from __future__ import annotations

import base64
import binascii
import pickle
from typing import Any, Literal

import cloudpickle
from prefect.serializers import Serializer
from pydantic_core import SchemaSerializer, core_schema

SERIALIZER_TYPE = "juicecache-pickle"
# Every pickle of protocol 2 or later starts with the PROTO opcode; base64 text never does.
PICKLE_START = pickle.PROTO


def _as_base64(blob: bytearray) -> str:
    return base64.b64encode(blob).decode("ascii")


class Pickled(bytearray):
    """A pickle as `dumps` returns it: raw bytes, and base64 text once inside a JSON document.

    pydantic asks an object it has no schema for (Prefect's record types its `result` as
    `Any`) for its `__pydantic_serializer__`, so the encoding happens exactly where JSON is
    written, whoever writes it. A bytearray, not a bytes subclass: the pickler writes
    straight into it (`write`), where building a bytes subclass would copy every payload
    once more (0.15-0.5 s for 256 MiB on a busy 2-core machine).
    """

    __pydantic_serializer__ = SchemaSerializer(
        core_schema.any_schema(
            serialization=core_schema.plain_serializer_function_ser_schema(_as_base64, when_used="json")
        )
    )

    def write(self, chunk: bytes) -> int:
        self += chunk
        return len(chunk)


class RawPickleSerializer(Serializer):
    """cloudpickle in, pickle out, nothing around it: what `cached_task` stores by default.

    Registered with Prefect under the type name "juicecache-pickle" (by subclassing), so any
    process that imports juicecache reads these entries; entries written with Prefect's own
    serializers stay readable too, as their records name their serializer.
    """

    type: Literal["juicecache-pickle"] = SERIALIZER_TYPE

    def dumps(self, obj: Any) -> bytes:
        pickled = Pickled()
        cloudpickle.Pickler(pickled, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
        return pickled  # type: ignore[return-value]  (bytes-like, and JSON-safe: see `Pickled`)

    def loads(self, blob: bytes) -> Any:
        # Only ever given content whose digest or signature `EntryStorage` has checked: a
        # payload file's raw pickle, or the base64 text of a JSON record (task parameters).
        if blob[:1] != PICKLE_START:
            try:
                blob = base64.b64decode(blob, validate=True)
            except binascii.Error:
                raise ValueError("not a juicecache pickle: neither a pickle nor its base64 text") from None
        return pickle.loads(blob)
