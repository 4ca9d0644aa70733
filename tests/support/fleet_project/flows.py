"""A user's project as a fleet runs it: `flows.py:fleet_flow`, deployed from this folder, run
by `prefect worker` processes on several hosts, mapped over Dask workers, or run as a script:

    python flows.py RUN ITEM...

The folder has no `.env`: every host's settings come from its own environment. The cached
task leaves one marker file on the volume (under the folder RUN) each time its body runs,
naming the host that ran it by its mount point (hosts share a hostname in the tests); the
flow leaves one visit file per flow run (named by its id), naming the host that ran the flow.

Nothing the task's body calls is defined in this module: a Dask worker unpickles the task
by value and need not be able to import this file.
"""

import json
import os
import sys
import uuid
from pathlib import Path

from prefect import flow, runtime
from prefect.utilities.annotations import unmapped

from juicecache import cached_task, get_settings


@cached_task
def measure(item: int, run: str) -> dict:
    """The key is (item, run), the same on every host: RUN is a folder name relative to the volume."""
    mount_point = str(get_settings().mount_point)  # the settings this process's cache resolved
    markers = Path(mount_point) / run / "markers"
    markers.mkdir(parents=True, exist_ok=True)
    record = {"item": item, "host": mount_point, "pid": os.getpid()}
    (markers / f"{item}-{uuid.uuid4().hex}").write_text(json.dumps(record))
    return {"item": item, "square": item * item, "computed_on": mount_point}


@flow(name="fleet-flow")
def fleet_flow(items: list[int], run: str) -> list[dict]:
    mount_point = str(get_settings().mount_point)
    visits = Path(mount_point) / run / "visits"
    visits.mkdir(parents=True, exist_ok=True)
    (visits / str(runtime.flow_run.id)).write_text(json.dumps({"host": mount_point, "items": items}))
    return [future.result() for future in measure.map(items, run=unmapped(run))]


if __name__ == "__main__":
    state = fleet_flow(items=[int(item) for item in sys.argv[2:]], run=sys.argv[1], return_state=True)
    print(json.dumps({"flow_run_id": str(state.state_details.flow_run_id), "state": state.name}))
