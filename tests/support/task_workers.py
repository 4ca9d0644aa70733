"""Prefect task workers serving tests/support/task_worker_flow.py, and what their runs left, for
tests/test_task_workers.py (one host) and tests/test_multihost.py (two hosts, on its cluster).

Every task worker runs in its own process group and is stopped (SIGTERM, then SIGKILL) before
its volume is unmounted, whatever happens in the test.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.support.processes import stop_group, wait_until

WORKER_FLOW = Path(__file__).parent / "task_worker_flow.py"
# Prefect 3.9.1's task worker can deadlock when a run's thread first sends logs to the API
# (creating the log service waits for the event loop) while the loop, receiving the next run,
# waits for the same service lock to emit an event. Not juicecache's: the workers log locally.
WORKER_ENV = {"PREFECT_LOGGING_TO_API_ENABLED": "false"}
READY = "Subscribing to runs of task(s)"


@dataclass
class Worker:
    name: str
    process: subprocess.Popen
    log: Path

    def tail(self) -> str:
        return f"--- worker {self.name} ---\n" + self.log.read_text(errors="replace")[-3000:]


@contextmanager
def task_workers(starts: list[tuple[str, list[str], dict[str, str], Path]], logs: Path) -> Iterator[list[Worker]]:
    """Start one task worker per (name, argv, env, marker dir); wait until each has subscribed;
    stop them all (their process groups) on exit."""
    logs.mkdir(parents=True, exist_ok=True)
    workers: list[Worker] = []
    try:
        for name, argv, env, markers in starts:
            log = logs / f"worker-{name}.log"
            with open(log, "wb") as out:
                process = subprocess.Popen(
                    [*argv, "serve", name, str(markers)], env={**env, **WORKER_ENV}, stdout=out,
                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                )
            workers.append(Worker(name, process, log))
        for worker in workers:
            ready = wait_until(lambda w=worker: READY in w.log.read_text(errors="replace") or w.process.poll() is not None, 180)
            assert ready and worker.process.poll() is None, worker.tail()
        yield workers
    finally:
        for worker in workers:
            if worker.process.poll() is None:
                stop_group(worker.process)


def submit(argv: list[str], env: dict[str, str], values: list[int]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*argv, "submit", *map(str, values)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL, text=True, start_new_session=True,
    )


def outcomes(process: subprocess.Popen[str], workers: list[Worker], timeout: float = 200) -> dict[int, dict]:
    """The submitter's report, by input: task run, final state name, value. The submitter gives
    up on its runs (and fails, naming the run) after task_worker_flow.SUBMISSION_SECONDS; `timeout` only bounds a submitter that hangs."""
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_group(process)
        stdout, stderr = process.communicate()
    logs = "\n".join(worker.tail() for worker in workers)
    assert process.returncode == 0, f"{stderr[-3000:]}\n{logs}"
    return {line["x"]: line for line in map(json.loads, stdout.splitlines())}


def computed(markers: Path) -> list[dict]:
    """One marker per run of the task's body."""
    folder = markers / "computed"
    return [json.loads(path.read_text()) for path in folder.iterdir()] if folder.is_dir() else []


def served(markers: Path, task_run: str) -> dict:
    """Which worker finished a run, and in which state (the task's on_completion hook)."""
    path = markers / "served" / task_run
    assert wait_until(path.exists, 60), f"no served marker for task run {task_run}"
    return json.loads(path.read_text())


def expected(x: int, token: str) -> dict:
    return {"x": x, "square": x * x, "token": token}
