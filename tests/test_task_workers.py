"""Background runs of a cached task: `task.delay(...)` served by Prefect task workers (issue #18).

A submitter stores the run's parameters through the task's result storage, as a JSON result
record (`prefect.task_worker.store_parameters`), and a task worker anywhere reads them back.
With juicecache those parameters go to `parameters/` on the volume, so a worker on any host
reads them, and the run's result is an ordinary cache entry: the same key everywhere,
computed once, a hit served from the volume by whichever worker gets the run.

Every task worker runs in its own process group and is stopped (SIGTERM, then SIGKILL) before
its volume is unmounted, whatever happens in the test.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from juicecache.entryfile import read_header
from tests.support import netns
from tests.support.cluster import Machine, running_cluster
from tests.support.environment import Sandbox, is_mounted
from tests.support.processes import stop_group, wait_until

WORKER_FLOW = Path(__file__).parent / "support" / "task_worker_flow.py"
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


def outcomes(process: subprocess.Popen[str], workers: list[Worker], timeout: float = 300) -> dict[int, dict]:
    """The submitter's report, by input: task run, final state name, value."""
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


def test_delay_from_two_processes_computes_once(mounted: Sandbox) -> None:
    """One host, the session's Prefect server, one task worker: two processes submit the same
    inputs at once and both get the value, computed once; other inputs compute again. The
    parameters are on the volume, out of `cache gc`'s way until they are a week old."""
    token = secrets.token_hex(4)
    markers = mounted.mount_point / "markers"
    env = {**mounted.env, "TASK_WORKER_TOKEN": token}
    argv = [sys.executable, str(WORKER_FLOW)]
    with task_workers([("solo", argv, env, markers)], mounted.path / "logs") as workers:
        first, second = submit(argv, env, [3]), submit(argv, env, [3])
        both = [outcomes(first, workers)[3], outcomes(second, workers)[3]]
        assert [run["value"] for run in both] == [expected(3, token)] * 2, (both, workers[0].tail())
        assert sorted(run["state"] for run in both) == ["Cached", "Completed"], both
        assert [marker["x"] for marker in computed(markers)] == [3]

        other = outcomes(submit(argv, env, [4]), workers)[4]
        assert other["value"] == expected(4, token) and other["state"] == "Completed"
        assert sorted(marker["x"] for marker in computed(markers)) == [3, 4]

    cache = mounted.mount_point / "prefect-cache"
    parameters = sorted((cache / "parameters").iterdir())
    assert len(parameters) == 3  # one per submission
    assert all(read_header(path).digest for path in parameters)  # written like entries: checked (or signed)
    entries = sorted(path.name for path in (cache / "records").iterdir())
    assert len(entries) == 2 and all(read_header(cache / "records" / name).inline is not None for name in entries)

    listed = json.loads(mounted.run("cache", "ls", "--json").stdout)
    assert sorted(entry["key"] for entry in listed["entries"]) == entries
    assert all(entry["problem"] is None for entry in listed["entries"]), listed
    week_old = time.time() - 8 * 24 * 3600
    os.utime(parameters[0], (week_old, week_old))
    gc = json.loads(mounted.run("cache", "gc", "--json").stdout)
    assert gc["removed"] == [] and gc["leftovers_removed"] == 1, gc
    assert sorted((cache / "parameters").iterdir()) == parameters[1:]


@pytest.mark.multihost
@pytest.mark.skipif(netns.unavailable_reason() is not None, reason=str(netns.unavailable_reason()))
def test_task_workers_on_two_hosts_share_the_cache(tmp_path: Path) -> None:
    """Hosts A and B (network namespaces, one shared volume and Prefect server), a task worker on
    each. Six new inputs submitted from A compute once each, on whichever worker gets them; the
    same six submitted from B are all hits, and some are served by the host that did not compute
    them (reading the entry another host wrote, through its own mount). Each submission's
    parameters are written through the submitter's mount and read through the worker's."""
    token = secrets.token_hex(4)
    values = [1, 2, 3, 4, 5, 6]
    mount_points: list[Path] = []
    (tmp_path / "cluster").mkdir()
    with running_cluster(tmp_path / "cluster") as cluster:
        mount_points = [machine.mount_point for machine in cluster.machines]
        # One folder on the volume, seen by each host through its own mount.
        markers = {"a": cluster.a.mount_point / f"markers-{token}", "b": cluster.b.mount_point / f"markers-{token}"}

        def argv(machine: Machine) -> list[str]:
            return machine.host.argv(machine.argv(script=WORKER_FLOW))

        def env(machine: Machine) -> dict[str, str]:
            return {**machine.env, "TASK_WORKER_TOKEN": token}

        starts = [(name, argv(machine), env(machine), markers[name]) for name, machine in (("a", cluster.a), ("b", cluster.b))]
        with task_workers(starts, tmp_path / "logs") as workers:
            first = outcomes(submit(argv(cluster.a), env(cluster.a), values), workers)
            assert {x: run["value"] for x, run in first.items()} == {x: expected(x, token) for x in values}
            assert {run["state"] for run in first.values()} == {"Completed"}, first
            bodies = computed(markers["a"])
            assert sorted(body["x"] for body in bodies) == values, bodies
            computed_by = {body["x"]: body["worker"] for body in bodies}
            assert all(served(markers["a"], run["task_run"])["worker"] == computed_by[x] for x, run in first.items())

            # Which worker gets a run is the server's choice: another round of the same hits
            # (at most two more) when every hit happened to go to the worker that computed it.
            crossed: list[tuple[int, str, str]] = []
            rounds = 0
            while not crossed and rounds < 3:
                rounds += 1
                again = outcomes(submit(argv(cluster.b), env(cluster.b), values), workers)
                assert {x: run["value"] for x, run in again.items()} == {x: expected(x, token) for x in values}
                assert {run["state"] for run in again.values()} == {"Cached"}, again
                by = {x: served(markers["b"], run["task_run"]) for x, run in again.items()}
                assert {record["state"] for record in by.values()} == {"Cached"}
                crossed = [(x, computed_by[x], record["worker"]) for x, record in by.items() if record["worker"] != computed_by[x]]
            assert crossed, f"in {rounds} rounds every hit was served by the worker that computed it: {computed_by}"
            assert len(computed(markers["b"])) == len(values)  # no hit ran the body

            parameters = sorted((cluster.a.mount_point / "prefect-cache" / "parameters").iterdir())
            assert len(parameters) == len(values) * (1 + rounds)
        assert all(worker.process.poll() is not None for worker in workers)
    assert mount_points and not any(is_mounted(path) for path in mount_points)
