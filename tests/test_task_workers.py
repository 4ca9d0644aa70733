"""Background runs of a cached task: `task.delay(...)` served by Prefect task workers (issue #18).

A submitter stores the run's parameters through the task's result storage, as a JSON result
record (`prefect.task_worker.store_parameters`), and a task worker anywhere reads them back.
With juicecache those parameters go to `parameters/` on the volume, so a worker on any host
reads them, and the run's result is an ordinary cache entry: the same key everywhere,
computed once, a hit served from the volume by whichever worker gets the run.

Every task worker runs in its own process group and is stopped (SIGTERM, then SIGKILL) before
its volume is unmounted, whatever happens in the test (tests/support/task_workers.py). The
two-host version, task workers on hosts A and B, is in tests/test_multihost.py, on its cluster.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
import time

from juicecache.entryfile import read_header
from tests.support.environment import Sandbox
from tests.support.task_workers import WORKER_FLOW, computed, expected, outcomes, submit, task_workers


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
