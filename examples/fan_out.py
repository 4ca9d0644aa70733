"""A fan-out over many items, each cached on its own: a rerun computes only the new items.

    python examples/fan_out.py 1 2 3 4 5 6    # scores 6 items (1 s each, 4 at a time)
    python examples/fan_out.py 1 2 3 4 5 6 7  # reads 6 from the volume, scores only item 7

Several machines can run this at once on overlapping items: the cross-host lock makes
each item compute once, the others wait for it and read its entry.
"""

from __future__ import annotations

import sys
import time

# juicecache before prefect: the Prefect settings in `.env` then apply too (see docs/library.md).
from juicecache import cached_task
from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner


@cached_task(task_run_name="score {item}", retries=2)  # Prefect's own task options pass through
def score(item: int) -> int:
    """Stands for a slow call per item (a model, an API, a simulation)."""
    time.sleep(1)
    return item * item


@flow(task_runner=ThreadPoolTaskRunner(max_workers=4), log_prints=True)
def score_all(items: list[int]) -> int:
    total = sum(score.map(items).result())
    print(f"{len(items)} items scored: total {total}")
    return total


if __name__ == "__main__":
    score_all([int(arg) for arg in sys.argv[1:]] or list(range(1, 13)))
