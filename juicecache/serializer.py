"""Result payloads as plain pickles, without the base64 wrapping of Prefect's default.

Prefect's `pickle` serializer base64-encodes its output, so that a result can sit inside
a JSON document. juicecache stores every payload in a file of its own (`data/KEY`), where
the encoding buys nothing and costs a lot: a third more bytes to store and move, and, in
the benchmark (`bench/`), most of the time of writing or reading a large result
(`base64.encodebytes` is a Python loop over 57-byte pieces, ~1.7 s of a 2.4 s 64 MiB write).
"""

from __future__ import annotations

import pickle
from typing import Any, Literal

import cloudpickle
from prefect.serializers import Serializer

SERIALIZER_TYPE = "juicecache-pickle"


class RawPickleSerializer(Serializer):
    """cloudpickle in, pickle out, nothing around it: what `cached_task` stores by default.

    Registered with Prefect under the type name "juicecache-pickle" (by subclassing), so any
    process that imports juicecache reads these entries; entries written with Prefect's own
    serializers stay readable too, as their records name their serializer.
    """

    type: Literal["juicecache-pickle"] = SERIALIZER_TYPE

    def dumps(self, obj: Any) -> bytes:
        return cloudpickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)

    def loads(self, blob: bytes) -> Any:
        # Only ever given content whose digest or signature `EntryStorage` has checked.
        return pickle.loads(blob)
