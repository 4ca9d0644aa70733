"""Prefect cache policies on the shared volume, for tests/test_policies.py.

    python policy_flows.py SHAPE MARKER_DIR X [FLAG] [START]

SHAPE: `policy` (`cached_task(cache_policy=INPUTS + TASK_SOURCE)`), `debug` (`INPUTS -
"debug"`, FLAG the debug argument) or `plain` (a plain `@task` with `juicecache.shared`).
Each body run leaves a marker file in MARKER_DIR. START (a start gate's path, see
tests/support/start_gate.py, or epoch seconds) is a start barrier. Prints one JSON line:
the task run's state, its result and when the flow began.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
import time
from pathlib import Path

# As a user's project sorts them: juicecache (third-party there) before prefect.
import juicecache
from juicecache import cached_task
from prefect import flow, task
from prefect.cache_policies import INPUTS, TASK_SOURCE

from tests.support.start_gate import wait_for_start

# Long enough that 4 processes released by the barrier all begin before it ends on a loaded machine.
# A run that no other process overlaps may take less (POLICY_WORK_SECONDS): what it shows does
# not depend on how long the body lasts, only on whether it ran (its marker).
WORK_SECONDS = float(os.environ.get("POLICY_WORK_SECONDS", "4.0"))


def mark(marker_dir: str, x: int) -> None:
    Path(marker_dir).mkdir(exist_ok=True)
    (Path(marker_dir) / f"{x}-{os.getpid()}-{secrets.token_hex(4)}").touch()
    time.sleep(WORK_SECONDS)


@cached_task(cache_policy=INPUTS + TASK_SOURCE)
def with_source(x: int, marker_dir: str) -> int:
    mark(marker_dir, x)
    return x + 100


@cached_task(cache_policy=INPUTS - "debug")
def debug_free(x: int, marker_dir: str, debug: bool = False) -> int:
    mark(marker_dir, x)
    return x + 200


@task(
    cache_policy=juicecache.shared(INPUTS), result_storage=juicecache.shared_storage(),
    result_serializer="juicecache-pickle", persist_result=True,
)
def plain(x: int, marker_dir: str) -> int:
    mark(marker_dir, x)
    return x + 300


@flow(name="policies")
def policies(shape: str, x: int, marker_dir: str, flag: bool, start: str = "0") -> dict:
    wait_for_start(start)  # the barrier, once this flow run exists
    began = time.time()
    if shape == "policy":
        state = with_source(x, marker_dir, return_state=True)
    elif shape == "debug":
        state = debug_free(x, marker_dir, debug=flag, return_state=True)
    else:
        state = plain(x, marker_dir, return_state=True)
    return {"state": state.name, "result": state.result(), "began": began}


if __name__ == "__main__":
    shape, marker_dir, x = sys.argv[1], sys.argv[2], int(sys.argv[3])
    flag = len(sys.argv) > 4 and sys.argv[4] == "1"
    start = sys.argv[5] if len(sys.argv) > 5 else "0"
    print(json.dumps(policies(shape, x, marker_dir, flag, start)))
