"""A user flow for tests/test_report.py: `python report_flow.py alpha:1 beta:2 alpha:1 ...`.

Runs each call in order in one flow run (its own tasks, named for this test alone) and
prints one JSON list of the task runs' state names.
"""

from __future__ import annotations

import json
import sys
import time

# As a user's project sorts them: juicecache (third-party there) before prefect.
from juicecache import cached_task
from prefect import flow


@cached_task
def alpha(x: int) -> int:
    time.sleep(1.0)
    return x


@cached_task
def beta(x: int) -> str:
    time.sleep(0.5)
    return "b" * x


@flow(name="report-flow")
def report_flow(calls: list[str]) -> list[str]:
    tasks = {"alpha": alpha, "beta": beta}
    return [tasks[name](int(x), return_state=True).name for name, x in (call.split(":") for call in calls)]


if __name__ == "__main__":
    print(json.dumps(report_flow(sys.argv[1:])))
