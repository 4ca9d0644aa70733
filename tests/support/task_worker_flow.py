"""Background runs of a cached task, for tests/test_task_workers.py.

    python task_worker_flow.py serve WORKER MARKER_DIR     # a task worker serving `square`
    python task_worker_flow.py submit X [X...]              # square.delay(X, TOKEN) for each X, then wait

TOKEN is the environment's TASK_WORKER_TOKEN: part of every key, so each test has new keys.

The worker leaves markers on the volume (MARKER_DIR, the same folder through any host's
mount): `computed/…` each time the task's body runs, and `served/TASK_RUN_ID` for each run it
finished, saying which worker (WORKER) served it and in which state (`Completed` when it
computed, `Cached` when the volume answered). All hosts of a test share one hostname (network
namespaces), so the worker is named by WORKER, not by hostname.

`submit` prints one JSON line per input: its task run, its final state's name and its value,
read from the final state as `future.result()` reads it: Prefect loads the result storage
named in the state from the server (juicecache's `juicecache-results` block), which reads the
entry through this host's mount.
"""

from __future__ import annotations  # noqa: I001  (juicecache before prefect, as below)

import json
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any

# As a user's project sorts them: juicecache (third-party there) before prefect, which lets
# it apply the Prefect settings in a worker's `.env`.
from juicecache import cached_task
from prefect import get_client
from prefect.task_worker import serve

WORK_SECONDS = 1.0
SUBMISSION_SECONDS = 150


def note_served(task: Any, task_run: Any, state: Any) -> None:
    served = Path(os.environ["TASK_WORKER_MARKERS"]) / "served"
    served.mkdir(parents=True, exist_ok=True)
    (served / str(task_run.id)).write_text(json.dumps({"worker": os.environ["TASK_WORKER_NAME"], "state": state.name}))


@cached_task(on_completion=[note_served])
def square(x: int, token: str) -> dict[str, Any]:
    computed = Path(os.environ["TASK_WORKER_MARKERS"]) / "computed"
    computed.mkdir(parents=True, exist_ok=True)
    worker = os.environ["TASK_WORKER_NAME"]
    (computed / f"{x}-{worker}-{os.getpid()}-{secrets.token_hex(4)}").write_text(json.dumps({"x": x, "worker": worker, "token": token}))
    time.sleep(WORK_SECONDS)
    return {"x": x, "square": x * x, "token": token}


def final_state(client: Any, task_run_id: Any, deadline: float) -> Any:
    """Polled until `deadline` (monotonic): Prefect's event-based `future.wait()` misses the end
    of a run that finishes before its event subscription is up (a hit on a warm worker), and then
    waits out its timeout. A task run read just after `delay` may have no state yet: not final either."""
    while True:
        state = client.read_task_run(task_run_id).state
        if (state is not None and state.is_final()) or time.monotonic() >= deadline:
            return state
        time.sleep(0.2)


def submit(values: list[int], token: str) -> None:
    futures = [square.delay(x, token) for x in values]
    # One deadline for the whole submission, well inside the test's own timeout, so that a run
    # that never ends is reported (its state, the workers' logs) rather than cut short.
    deadline = time.monotonic() + SUBMISSION_SECONDS
    with get_client(sync_client=True) as client:
        for x, future in zip(values, futures, strict=True):
            state = final_state(client, future.task_run_id, deadline)
            if state is None or not state.is_final():
                sys.exit(f"task run {future.task_run_id} (x={x}) is still {state and state.name} after {SUBMISSION_SECONDS} s")
            value = state.result() if state.is_completed() else None  # what `future.result()` does
            print(json.dumps({"x": x, "task_run": str(future.task_run_id), "state": state.name, "value": value}), flush=True)


if __name__ == "__main__":
    command, *rest = sys.argv[1:]
    if command == "serve":
        os.environ["TASK_WORKER_NAME"], os.environ["TASK_WORKER_MARKERS"] = rest
        serve(square)
    else:
        submit([int(x) for x in rest], os.environ["TASK_WORKER_TOKEN"])
