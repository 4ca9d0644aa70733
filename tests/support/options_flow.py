"""cached_task's own options and async tasks, as a user's flow uses them (tests/test_honesty_options.py).

    python options_flow.py MARKERS '[["expiring", 1], ["sleep", 2.5], ["expiring", 1], ["async_pair", 7], ...]'

Runs the steps in one flow run and prints one JSON line: each call's task, Prefect state
name and result. Each time a task body runs it appends its name and argument to MARKERS.
"async_pair" calls the async task twice at once (asyncio.gather) with one new argument.
"""

from __future__ import annotations  # noqa: I001  (juicecache before prefect, as in a user's project)

import asyncio
import inspect
import json
import sys
import time
from typing import Any

# As a user's project sorts them: juicecache (third-party there) before prefect.
from juicecache import cached_task
from prefect import flow

MARKERS = sys.argv[1]


def mark(name: str, x: int) -> None:
    with open(MARKERS, "a") as log:  # one short append: atomic between processes
        log.write(json.dumps([name, x]) + "\n")


@cached_task(expire="2s")
def expiring(x: int) -> int:
    mark("expiring", x)
    return x + 1


@cached_task(refresh=True)
def refreshing(x: int) -> int:
    mark("refreshing", x)
    return x + 2


@cached_task
async def slow_async(x: int) -> int:
    mark("slow_async", x)
    await asyncio.sleep(1.5)
    return x * 10


async def value(state: Any) -> Any:
    result = state.result()
    return await result if inspect.isawaitable(result) else result


TASKS = {"expiring": expiring, "refreshing": refreshing}


@flow(name="options-flow")
async def options_flow(steps: list[list[Any]]) -> list[dict[str, Any]]:
    outcomes = []
    for name, argument in steps:
        if name == "sleep":
            time.sleep(argument)
        elif name == "async_pair":
            states = await asyncio.gather(*(slow_async(argument, return_state=True) for _ in range(2)))
            outcomes.extend([{"task": "slow_async", "state": s.name, "result": await value(s)} for s in states])
        elif name == "async":
            state = await slow_async(argument, return_state=True)
            outcomes.append({"task": "slow_async", "state": state.name, "result": await value(state)})
        else:
            state = TASKS[name](argument, return_state=True)
            outcomes.append({"task": name, "state": state.name, "result": await value(state)})
    return outcomes


if __name__ == "__main__":
    print(json.dumps(asyncio.run(options_flow(json.loads(sys.argv[2])))))
