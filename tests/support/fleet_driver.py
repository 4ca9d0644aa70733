"""What the fleet tests ask Prefect and Dask, from a host that does not mount the volume.

    python fleet_driver.py steps STEP...        Prefect steps, in order, each a JSON list:
        ["deploy", PROJECT, POOL, [QUEUE...]]   the pool, its queues, a deployment of PROJECT/flows.py:fleet_flow
        ["run", QUEUE, RUN, [ITEM...]]          a run of that deployment, picked up from QUEUE; waits for it
        ["task-runs", FLOW_RUN_ID, COUNT]       a finished flow run's COUNT task runs
    python fleet_driver.py dask SCHEDULER PROJECT RUN ITEMS PLACEMENT...
        `flows.measure` mapped over the Dask cluster at SCHEDULER, once per PLACEMENT
        "FIRST,SECOND" (host IP addresses): the first half of ITEMS ("1,2,...") on the worker
        of FIRST, the rest on SECOND's, so that work lands where the test says.

It prints one JSON list (one answer per step or placement) on a line of its own after
RESULT. One process for several steps: each Prefect import costs seconds. Nothing here
needs juicecache's settings or its volume: the process has none (no JFS_*, no
JUICECACHE_*), as a scheduler host or a CI job would not.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any
from uuid import UUID

RESULT = "fleet-driver-result:"
DEPLOYMENT = "fleet-flow/fleet"


def storage_key(state: Any) -> str | None:
    """The cache entry a task run's state points to (a state's data, or the API's copy of its metadata)."""
    data = state.data if state is not None else None
    metadata = getattr(data, "metadata", data)
    if isinstance(metadata, dict):
        return metadata.get("storage_key")
    return getattr(metadata, "storage_key", None)


def deploy(project: str, pool: str, queues: list[str]) -> dict[str, Any]:
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        template = ProcessWorker.get_default_base_job_template()
        try:  # a worker started first may have created it already
            client.create_work_pool(WorkPoolCreate(name=pool, type="process", base_job_template=template))
        except ObjectAlreadyExists:
            pass
        for queue in queues:
            try:
                client.create_work_queue(name=queue, work_pool_name=pool)
            except ObjectAlreadyExists:
                pass
    # A local folder: the deployment's pull step is "set the working directory to PROJECT".
    deployment_id = flow.from_source(source=str(Path(project).resolve()), entrypoint="flows.py:fleet_flow").deploy(
        name=DEPLOYMENT.split("/")[1], work_pool_name=pool, print_next_steps=False,
    )
    return {"deployment_id": str(deployment_id)}


def task_runs(flow_run_id: str, expected: int) -> list[dict[str, Any]]:
    """The flow run's task runs, once `expected` of them are final: the server records them from
    events, a moment after the flow run itself ends."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    flow_runs = FlowRunFilter(id=FlowRunFilterId(any_=[UUID(flow_run_id)]))
    deadline = time.monotonic() + 60
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(flow_run_filter=flow_runs)
            final = [run for run in runs if run.state is not None and run.state.is_final()]
            if len(final) >= expected or time.monotonic() > deadline:
                break
            time.sleep(0.25)
    return sorted(
        ({"name": run.name, "state": run.state_name, "key": storage_key(run.state)} for run in runs),
        key=lambda run: (run["state"] or "", run["key"] or ""),
    )


def run(queue: str, run_name: str, items: list[int]) -> dict[str, Any]:
    from prefect.deployments import run_deployment

    flow_run = run_deployment(
        DEPLOYMENT, parameters={"items": items, "run": run_name}, work_queue_name=queue,
        timeout=150, poll_interval=0.5, as_subflow=False,
    )
    return {
        "flow_run_id": str(flow_run.id),
        "state": flow_run.state_name,
        "work_queue": flow_run.work_queue_name,
        "task_runs": task_runs(str(flow_run.id), len(items)),
    }


STEPS = {"deploy": deploy, "run": run, "task-runs": task_runs}


def dask(scheduler: str, project: str, run_name: str, items: list[int], placements: list[list[str]]) -> list[list[dict]]:
    import dask as dask_config
    from prefect import flow
    from prefect.context import FlowRunContext
    from prefect.futures import wait
    from prefect.utilities.annotations import unmapped
    from prefect_dask import DaskTaskRunner

    sys.path.insert(0, project)
    from flows import measure  # a Task: Dask workers get it (and the function in it) pickled by value

    @flow(name="fleet-dask")
    def fleet_dask(first: str, second: str) -> list[dict[str, Any]]:
        half = len(items) // 2
        futures = []
        for host, part in ((first, items[:half]), (second, items[half:])):
            with dask_config.annotate(workers=[host]):  # any worker on that host, and no other
                futures.extend(measure.map(part, run=unmapped(run_name)))
        wait(futures)
        # Which worker ran each task: the one holding its result.
        held_by = FlowRunContext.get().task_runner.client.who_has([future.wrapped_future for future in futures])
        return [
            {
                "item": item,
                "state": future.state.name,
                "value": future.result(),
                "key": storage_key(future.state),
                "ran_on": sorted({address.split("://")[1].rsplit(":", 1)[0] for address in held_by[future.wrapped_future.key]}),
            }
            for item, future in zip(items, futures, strict=True)
        ]

    on_cluster = fleet_dask.with_options(task_runner=DaskTaskRunner(address=scheduler))
    return [on_cluster(first, second) for first, second in placements]


def main(command: str, args: list[str]) -> list[Any]:
    if command == "steps":
        return [STEPS[name](*step) for name, *step in map(json.loads, args)]
    if command == "dask":
        scheduler, project, run_name, items, *placements = args
        return dask(scheduler, project, run_name, [int(item) for item in items.split(",")], [p.split(",") for p in placements])
    raise SystemExit(f"unknown command {command!r}")


if __name__ == "__main__":
    print(RESULT, json.dumps(main(sys.argv[1], sys.argv[2:])), flush=True)
