"""An expensive data-preparation step, computed once and reused by several downstream flows.

    python examples/prepare_once.py    # the first run anywhere prepares the data (3 s), then trains and reports
    python examples/prepare_once.py    # later runs, on any machine mounting the volume: no preparation

Both flows call `prepare_dataset`; only the first call computes it. Every later call, in
this process or another, on this machine or another, reads the entry from the shared
volume, and Prefect shows that task run as Cached.
"""

from __future__ import annotations

import time

# juicecache before prefect: the Prefect settings in `.env` then apply too (see docs/library.md).
from juicecache import cached_task
from prefect import flow


@cached_task(expire="7d")  # the key is the arguments: another source or size is another entry
def prepare_dataset(source: str, rows: int = 1000) -> list[dict[str, int]]:
    """Stands for a slow download and clean-up."""
    time.sleep(3)
    return [{"id": i, "value": (i * 37) % 101} for i in range(rows)]


@flow(log_prints=True)
def train(source: str = "sales-2024") -> float:
    data = prepare_dataset(source)
    mean = sum(row["value"] for row in data) / len(data)
    print(f"trained on {len(data)} rows of {source}: mean {mean:.2f}")
    return mean


@flow(log_prints=True)
def report(source: str = "sales-2024") -> int:
    data = prepare_dataset(source, rows=1000)  # the same arguments, spelled differently: the same entry
    outliers = sum(1 for row in data if row["value"] > 90)
    print(f"report on {source}: {outliers} outliers")
    return outliers


if __name__ == "__main__":
    train()
    report()
