"""A start barrier for processes started one after another (a Prefect import and a flow run's
creation take seconds each on 2 busy cores), so that they then run at the same time.

Each process, once ready, leaves a file next to the gate (`ready`) and waits until the gate
file exists (`wait_at`); the test opens the gate once every process is ready (`StartGate`).
Unlike a start time fixed in advance, the barrier lasts as long as the slowest start-up and no
longer, and a process that starts slower than expected cannot miss it. The gate lives on a
local folder every host sees (the hosts are network namespaces: one filesystem).
"""

from __future__ import annotations

import os
import secrets
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

# How often a waiting process looks for the gate: every process sees it open within this.
POLL = 0.01


def ready(gate: str) -> None:
    """Say this process is at the gate (a file `GATE.ready-PID`)."""
    Path(f"{gate}.ready-{os.getpid()}-{secrets.token_hex(3)}").touch()


def wait_at(gate: str) -> None:
    """Say this process is ready, then wait until the test opens the gate."""
    ready(gate)
    while not os.path.exists(gate):
        time.sleep(POLL)


def wait_for_start(start: str) -> None:
    """START, as the scripts take it: a gate's path, or epoch seconds to wait for ("0": none)."""
    try:
        at = float(start)
    except ValueError:
        wait_at(start)
        return
    time.sleep(max(0.0, at - time.time()))


class StartGate:
    """A gate for `processes` processes, in `folder`: pass `str(gate)` to each, then `open_when_ready`."""

    def __init__(self, folder: Path, processes: int) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"gate-{secrets.token_hex(4)}"
        self.processes = processes
        self.opened = 0.0

    def __str__(self) -> str:
        return str(self.path)

    def waiting(self) -> int:
        return len(list(self.path.parent.glob(f"{self.path.name}.ready-*")))

    def open_when_ready(self, started: Sequence[subprocess.Popen], timeout: float = 240) -> int:
        """Open the gate once every process is ready (or one of `started` has exited, or after
        `timeout`: the test then fails on that process's output, and the others are not left
        waiting). Returns how many were ready."""
        deadline = time.monotonic() + timeout
        while self.waiting() < self.processes and time.monotonic() < deadline:
            if any(process.poll() is not None for process in started):
                break
            time.sleep(0.05)
        count = self.waiting()
        self.path.touch()
        self.opened = time.time()
        return count
