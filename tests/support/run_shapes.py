"""A user's flows run every way Prefect runs them on one host, for tests/test_fleet.py.

    python run_shapes.py SHAPE MARKER_DIR [ARGS...]

Its cached task `double` leaves one file in MARKER_DIR each time its body runs, so the
test counts computations. Each shape prints one JSON line, its last:

- `script X` / `module X`: the flow as a script (module `__main__`), or imported as the
  module `run_shapes` (as a deployment's entrypoint loads it);
- `pickle-out FILE X`: computes `double(X)`, then writes the task, cloudpickled, to FILE;
  `pickle-in FILE X`: a fresh process unpickles it and calls it in a flow;
- `pool X...`: `double.map` on Prefect's `ProcessPoolTaskRunner`;
- `nested X`: `double(X)` twice inside a task, then twice inside one `with transaction()`;
- `hold X SECONDS`: `double(X)` inside a task that then goes on for SECONDS;
- `serve NAME`: `flow.serve()` of the script flow; `trigger NAME X`: runs that deployment.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any

# As a user's project sorts them: juicecache (third-party there) before prefect.
from juicecache import cached_task
from prefect import flow, task
from prefect.context import FlowRunContext
from prefect.task_runners import ProcessPoolTaskRunner
from prefect.transactions import transaction

WORK_SECONDS = 1.0


@cached_task
def double(x: int, marker_dir: str) -> int:
    """`marker_dir` is part of the key: every test has its own, so its own entries."""
    Path(marker_dir).mkdir(exist_ok=True)
    (Path(marker_dir) / f"{x}-{os.getpid()}-{secrets.token_hex(4)}").touch()
    time.sleep(WORK_SECONDS)
    return 2 * x


def outcome(state: Any) -> dict[str, Any]:
    return {"state": state.name, "result": state.result()}


@flow(name="shapes-script")
def script_flow(x: int, marker_dir: str) -> dict[str, Any]:
    return {"run": str(FlowRunContext.get().flow_run.id), **outcome(double(x, marker_dir, return_state=True))}


@flow(name="shapes-pool", task_runner=ProcessPoolTaskRunner(max_workers=2))
def pool_flow(xs: list[int], marker_dir: str) -> list[dict[str, Any]]:
    futures = double.map(xs, marker_dir)
    futures.wait()
    return [outcome(future.state) for future in futures]


@task
def twice_inside_a_task(x: int, marker_dir: str) -> list[dict[str, Any]]:
    return [outcome(double(x, marker_dir, return_state=True)) for _ in range(2)]


@flow(name="shapes-nested")
def nested_flow(x: int, marker_dir: str) -> dict[str, Any]:
    inside_task = twice_inside_a_task(x, marker_dir)
    with transaction():
        inside_transaction = [outcome(double(x + 1, marker_dir, return_state=True)) for _ in range(2)]
    return {"task": inside_task, "transaction": inside_transaction}


@task
def compute_then_go_on(x: int, marker_dir: str, seconds: float) -> dict[str, Any]:
    computed = outcome(double(x, marker_dir, return_state=True))
    time.sleep(seconds)
    return computed


@flow(name="shapes-hold")
def hold_flow(x: int, marker_dir: str, seconds: float) -> dict[str, Any]:
    return {**compute_then_go_on(x, marker_dir, seconds), "parent_ended": time.time()}


@flow(name="shapes-unpickled")
def call_in_flow(unpickled: Any, x: int, marker_dir: str) -> dict[str, Any]:
    return outcome(unpickled(x, marker_dir, return_state=True))


def main(shape: str, marker_dir: str, *args: str) -> Any:
    if shape in ("script", "module"):
        return {**script_flow(int(args[0]), marker_dir), "ended": time.time()}
    if shape == "pickle-out":
        import cloudpickle

        computed = script_flow(int(args[1]), marker_dir)
        Path(args[0]).write_bytes(cloudpickle.dumps(double))
        return computed
    if shape == "pickle-in":
        import pickle

        return call_in_flow(pickle.loads(Path(args[0]).read_bytes()), int(args[1]), marker_dir)
    if shape == "pool":
        return pool_flow([int(x) for x in args], marker_dir)
    if shape == "nested":
        started = time.monotonic()
        return {**nested_flow(int(args[0]), marker_dir), "seconds": time.monotonic() - started}
    if shape == "hold":
        return hold_flow(int(args[0]), marker_dir, float(args[1]))
    if shape == "serve":
        script_flow.serve(name=args[0])
        return None
    if shape == "trigger":
        from prefect.deployments import run_deployment

        run = run_deployment(f"shapes-script/{args[0]}", parameters={"x": int(args[1]), "marker_dir": marker_dir}, timeout=180)
        return {"run": str(run.id), "state": run.state.name if run.state else None}
    raise SystemExit(f"unknown shape {shape!r}")


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:])))
