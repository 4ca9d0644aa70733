"""A user flow that makes many cached-task runs in one process, for the fault and load tests.

    python fault_driver.py SPEC_JSON      # run the calls in SPEC, then exit
    python fault_driver.py --zygote       # read one SPEC per line on stdin, fork a child for each

SPEC: {"calls": [{"key": "k1", "refresh": false}, ...], "payload_bytes": 1000, "work_seconds": 0.5,
"expire": 20 (seconds, or null), "markers": "/path/markers.jsonl", "start_at": epoch or null,
"start_gate": a start gate's path (tests/support/start_gate.py) or null,
"pace": seconds between call starts, or null}.

Why one process for many runs: importing Prefect costs about 2 s of CPU, so 200 runs as 200
processes would measure Prefect's start-up, not the cache. A run here is one call of a
cached task (through the public `juicecache.cached_task`), inside one flow run per process.
Why a zygote: a test that kills a writer 20 times needs 20 fresh processes; forking one
that has imported everything (but not yet talked to the Prefect API, so holds no threads
or connections) makes each one cost about a second instead of several.

Each call prints one JSON line: key, Prefect state ("Cached" is a hit, "Completed" a miss,
"Failed" an error), whether the value is the one its key determines, timings, juicecache's
warnings, the error, `not_stored`: Prefect's error when committing the entry failed, and
when the run's lock manager gave it its key's lock and took it back (`locked`, `released`).
Each time the task body runs it appends a line to SPEC["markers"] (key, start, end, host,
pid), so a test can count computations per key.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import socket
import sys
import time
from datetime import timedelta
from typing import Any

# As a user's project sorts them: juicecache (third-party there) before prefect.
import juicecache
from juicecache import cached_task
from prefect import flow


def expected_value(key: str, payload_bytes: int) -> dict[str, Any]:
    """What `work(key, ...)` returns: a function of the key alone, checkable anywhere."""
    return {
        "key": key,
        "digest": hashlib.sha256(key.encode()).hexdigest(),
        "payload": hashlib.shake_256(key.encode()).digest(payload_bytes),
    }


@cached_task(cache_key_fn=lambda context, parameters: parameters["key"], name="fault-work", task_run_name="work {key}")
def work(key: str, payload_bytes: int, work_seconds: float, markers: str) -> dict[str, Any]:
    started = time.time()
    time.sleep(work_seconds)
    value = expected_value(key, payload_bytes)
    line = {"key": key, "start": started, "end": time.time(), "host": socket.gethostname(), "pid": os.getpid()}
    with open(markers, "a") as log:  # one short append: atomic between processes
        log.write(json.dumps(line) + "\n")
    return value


class Warnings(logging.Handler):
    """juicecache's warnings, so each call can report those it caused."""

    def __init__(self, level: int = logging.WARNING, starting: str = "") -> None:
        super().__init__(level)
        self.starting = starting
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith(self.starting):
            self.messages.append(record.getMessage()[:300])


# When this process took and let go of a key's lock, in order: (key, "locked" or "released", time).
_locks: list[tuple[str, str, float]] = []


def _watch_locks() -> None:
    """Note each lock Prefect takes and lets go through juicecache's lock manager, so that each
    run can say when it held its key: a test can then tell two runs that held one key at once."""
    from juicecache.locking import FlockLockManager

    acquire, release = FlockLockManager.acquire_lock, FlockLockManager.release_lock

    def acquire_lock(self: FlockLockManager, key: str, holder: str, *args: Any, **kwargs: Any) -> bool:
        taken = acquire(self, key, holder, *args, **kwargs)
        if taken:
            _locks.append((key, "locked", time.time()))
        return taken

    def release_lock(self: FlockLockManager, key: str, holder: str) -> None:
        release(self, key, holder)
        _locks.append((key, "released", time.time()))

    FlockLockManager.acquire_lock, FlockLockManager.release_lock = acquire_lock, release_lock  # type: ignore[method-assign]


def _first(events: list[tuple[str, str, float]], what: str) -> float | None:
    return next((at for _, kind, at in events if kind == what), None)


def emit(line: dict[str, Any]) -> None:
    os.write(1, (json.dumps(line) + "\n").encode())  # one write: lines from forked children never interleave


@flow(name="fault-driver", persist_result=False)
def drive(spec: dict[str, Any]) -> None:
    captured = Warnings()
    logging.getLogger("juicecache").addHandler(captured)
    # Prefect's own error when a transaction's commit fails (the entry was not stored). juicecache
    # says why in a warning, but once a minute per kind of failure: this one comes every time.
    not_stored = Warnings(logging.ERROR, "An error was encountered while committing transaction")
    logging.getLogger("prefect.task_runs").addHandler(not_stored)
    if spec.get("start_at"):
        time.sleep(max(0.0, spec["start_at"] - time.time()))
    if spec.get("start_gate"):
        from tests.support.start_gate import wait_at

        wait_at(spec["start_gate"])
    begun = time.monotonic()
    for number, call in enumerate(spec["calls"]):
        if spec.get("pace"):  # call N starts no earlier than N x pace seconds in: the batch spans a known time
            time.sleep(max(0.0, begun + number * spec["pace"] - time.monotonic()))
        options: dict[str, Any] = {}
        if spec.get("expire"):
            options["cache_expiration"] = timedelta(seconds=spec["expire"])
        if call.get("refresh"):
            options["refresh_cache"] = True
        seen, failed, locks = len(captured.messages), len(not_stored.messages), len(_locks)
        started, clock = time.time(), time.perf_counter()
        state = work.with_options(**options)(
            call["key"], spec.get("payload_bytes", 64), spec.get("work_seconds", 0.5), spec["markers"], return_state=True
        )
        seconds = time.perf_counter() - clock
        value_ok, error = None, None
        if state.is_completed():
            value_ok = state.result() == expected_value(call["key"], spec.get("payload_bytes", 64))
        else:
            error = _one_line(state)
        emit({
            "pid": os.getpid(), "host": socket.gethostname(), "key": call["key"], "state": state.name,
            "value_ok": value_ok, "seconds": round(seconds, 4), "start": started, "end": time.time(),
            "warnings": captured.messages[seen:], "error": error, "not_stored": not_stored.messages[failed:],
            "locked": _first(_locks[locks:], "locked"), "released": _first(_locks[locks:], "released"),
        })


def _one_line(state: Any) -> str:
    try:
        state.result()
    except BaseException as exc:  # the task's own exception
        return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:300]
    return str(state.message)[:300]


def zygote() -> None:
    """Fork one child per SPEC line on stdin; print {"child": PID} for each."""
    juicecache.volume_status()  # resolve settings now, and fail here rather than in every child
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children reap themselves: a SIGKILLed one leaves no zombie
    for line in sys.stdin:
        spec = json.loads(line)
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            try:
                drive(spec)
            finally:
                os._exit(0)
        emit({"child": pid})


if __name__ == "__main__":
    _watch_locks()
    if sys.argv[1:] == ["--zygote"]:
        zygote()
    else:
        drive(json.loads(sys.argv[1]))
