"""A user's own flow (not the demo), for tests/test_api.py.

    python tests/support/user_flow.py '[["square", [3], {}], ["cube", [], {"x": 3}]]'

Runs the task calls given as JSON in one flow run and prints one JSON line: each call's
task, Prefect state name and result. "<lock>" as an argument stands for a fresh
`threading.Lock`, which no cache key can be built from.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import Any

# As a user's project sorts them: juicecache (third-party there) before prefect.
from juicecache import cached_task
from prefect import flow

WORK_SECONDS = 2.0


@cached_task
def square(x: int, offset: int = 0) -> int:
    time.sleep(WORK_SECONDS)
    return x * x + offset


@cached_task
def cube(x: int, offset: int = 0) -> int:
    """The same parameters as `square`: it must never read square's entries."""
    time.sleep(WORK_SECONDS)
    return x**3 + offset


@cached_task
def guarded(x: int, lock: Any) -> int:
    return x


@cached_task(exclude=["lock"])
def guarded_excluding(x: int, lock: Any) -> int:
    return x


TASKS = {"square": square, "cube": cube, "guarded": guarded, "guarded_excluding": guarded_excluding}


def argument(value: Any) -> Any:
    return threading.Lock() if value == "<lock>" else value


@flow(name="user-flow")
def user_flow(calls: list[list[Any]]) -> list[dict[str, Any]]:
    outcomes = []
    for name, args, kwargs in calls:
        arguments = {key: argument(value) for key, value in kwargs.items()}
        state = TASKS[name](*[argument(value) for value in args], **arguments, return_state=True)
        outcomes.append({"task": name, "state": state.name, "result": state.result()})
    return outcomes


if __name__ == "__main__":
    print(json.dumps(user_flow(json.loads(sys.argv[1]))))
