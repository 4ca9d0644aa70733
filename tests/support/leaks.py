"""Looking for secrets where they must not be, and for files others could write.

Used by the fault suite: every command line seen while it runs (what `ps` would show),
texts it collected (outputs, logs, what the Prefect API holds), and the folders it made.
"""

from __future__ import annotations

import json
import os
import stat
import threading
import urllib.request
from collections.abc import Iterable
from pathlib import Path


class CommandLines:
    """Samples every process's command line, as `ps` shows them, until stopped."""

    def __init__(self, interval: float = 0.1) -> None:
        self.seen: set[str] = set()
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="command-lines", daemon=True)

    def __enter__(self) -> CommandLines:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while not self._stop.is_set():
            for proc in Path("/proc").iterdir():
                if proc.name.isdigit():
                    try:
                        self.seen.add((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
                    except OSError:
                        continue
            self._stop.wait(self._interval)


def prefect_records(api_url: str) -> dict[str, list[dict]]:
    """Everything the Prefect API keeps that a run could have written: artifacts, logs, run parameters."""
    records = {}
    for kind in ("artifacts", "logs", "flow_runs", "task_runs"):
        found: list[dict] = []
        while True:
            body = json.dumps({"limit": 200, "offset": len(found)}).encode()
            request = urllib.request.Request(
                f"{api_url}/{kind}/filter", data=body, headers={"Content-Type": "application/json"}, method="POST"
            )
            with urllib.request.urlopen(request, timeout=30) as response:
                page = json.load(response)
            found.extend(page)
            if len(page) < 200:
                break
        records[kind] = found
    return records


def secrets_found(secrets: dict[str, str], texts: dict[str, str]) -> list[str]:
    """"NAME in SOURCE" for every secret value that appears in a text."""
    return [f"{name} in {source}" for source, text in texts.items() for name, value in secrets.items() if value in text]


def world_writable(roots: Iterable[Path]) -> tuple[list[Path], int]:
    """Files and folders under `roots` that others may write, and how many were checked.

    Only what others can reach counts: a folder they cannot enter (no o+x) hides what is
    inside (JuiceFS keeps a 0666 `.lock` in a 0700 folder of its cache). Symlinks have no
    permissions of their own.
    """
    writable: list[Path] = []
    checked = 0
    for root in roots:
        if not root.exists():
            continue
        for folder, subfolders, files in os.walk(root):
            here = Path(folder)
            checked += 1
            mode = here.lstat().st_mode
            if mode & stat.S_IWOTH:
                writable.append(here)
            if not mode & stat.S_IXOTH:
                subfolders.clear()
                continue
            for name in files:
                path = here / name
                checked += 1
                try:
                    info = path.lstat()
                except OSError:
                    continue
                if not stat.S_ISLNK(info.st_mode) and info.st_mode & stat.S_IWOTH:
                    writable.append(path)
    return writable, checked
