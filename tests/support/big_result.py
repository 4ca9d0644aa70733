"""A flow whose cached task returns a large result: the subject of the kill -9 test.

    python big_result.py MEGABYTES  ->  {"cache": "Completed"|"Cached", "sha256": ..., "bytes": ...}

The result is pseudo-random (incompressible) bytes determined by MEGABYTES, so the
test knows what a correct value is.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys


def payload(megabytes: int) -> bytes:
    return random.Random(megabytes).randbytes(megabytes << 20)


def main() -> int:
    from juicecache.cli.run import prepare_prefect
    from juicecache.settings import load_settings

    settings = load_settings()
    prepare_prefect(settings)  # Prefect reads its settings at import: import it after this

    from prefect import flow

    from juicecache.cache import activate, cached_task

    activate(settings)
    big = cached_task(payload, name="big")

    @flow(name="big-result", persist_result=False)
    def run(megabytes: int) -> dict[str, object]:
        state = big(megabytes, return_state=True)
        value = state.result()
        return {"cache": state.name, "sha256": hashlib.sha256(value).hexdigest(), "bytes": len(value)}

    print(json.dumps(run(int(sys.argv[1]))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
