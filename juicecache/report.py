"""`cache report`: what the shared cache saved, per task and for the fleet.

Two sources, joined by cache key:
- the Prefect server's task runs in the window: a run whose stored state names juicecache's
  storage block (the server's `juicecache-results` document, or `entryfile.BLOCK_ID` where
  no server knew it) is one of ours, `Cached` is a hit and `Completed` a miss, and its
  `storage_key` is the entry's key, whose prefix is the task's name;
- the cache's own entries (`scan.scan`): each records how long computing it took (what a
  hit saves), its size (what a hit moves) and the host that computed it.

Without a server, the entries alone tell what is stored, by task and host. Reads the REST
API with the standard library: no Prefect import, so the command starts at once.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from juicecache.entryfile import BLOCK_ID, BLOCK_TYPE_SLUG, CACHE_KEY, RESULTS_BLOCK
from juicecache.scan import Entry, Scan

PAGE = 200  # the most task runs Prefect's API returns at once
TOP_HOSTS = 3
Progress = Callable[[int, int], None]


class ServerUnreachable(RuntimeError):
    """The Prefect server did not answer; the message is one line."""


@dataclass(frozen=True)
class CachedRun:
    """One task run of a cached task: a hit or a miss, when, and which entry."""

    key: str
    hit: bool
    when: float  # epoch seconds
    seconds: float  # the run's own duration

    @property
    def task(self) -> str:
        return task_of(self.key)


@dataclass
class TaskReport:
    """One task's figures over the window (`runs` is None without a server)."""

    task: str
    runs: int | None = None
    hits: int | None = None
    saved_seconds: float | None = None
    bytes_served: int | None = None
    entries: int = 0
    stored_bytes: int = 0
    hosts: list[tuple[str, int]] = field(default_factory=list)  # who computed its entries, most first

    @property
    def misses(self) -> int | None:
        return None if self.runs is None or self.hits is None else self.runs - self.hits

    @property
    def hit_rate(self) -> float | None:
        return self.hits / self.runs if self.runs and self.hits is not None else None

    def as_dict(self) -> dict[str, object]:
        return {
            "task": self.task, "runs": self.runs, "hits": self.hits, "misses": self.misses, "hit_rate": self.hit_rate,
            "saved_seconds": self.saved_seconds, "bytes_served": self.bytes_served, "entries": self.entries,
            "stored_bytes": self.stored_bytes, "top_hosts": [{"host": host, "entries": n} for host, n in self.hosts],
        }


def task_of(key: str) -> str:
    """The task's name in an entry key (`compute-<digest>` -> `compute`)."""
    return key.rsplit("-", 1)[0]


def fetch_runs(api_url: str, since: float, progress: Progress | None = None) -> list[CachedRun]:
    """Every hit and miss of a juicecache task that started after `since`, from the server's API."""
    after = datetime.fromtimestamp(since, UTC).isoformat()
    body = {
        "task_runs": {"expected_start_time": {"after_": after}, "state": {"name": {"any_": ["Cached", "Completed"]}}},
        "sort": "EXPECTED_START_TIME_ASC",
        "limit": PAGE,
    }
    ours = {str(BLOCK_ID), *_results_block_id(api_url)}
    runs: list[CachedRun] = []
    offset = 0
    while True:
        page = _post(f"{api_url.rstrip('/')}/task_runs/filter", {**body, "offset": offset})
        runs.extend(run for run in (_cached_run(run, ours) for run in page) if run is not None)
        offset += len(page)
        if progress is not None:
            progress(offset, 0)
        if len(page) < PAGE:
            return runs


def _results_block_id(api_url: str) -> list[str]:
    """The id of the server's `juicecache-results` block document (see `store.register_results_block`), if any."""
    url = f"{api_url.rstrip('/')}/block_types/slug/{BLOCK_TYPE_SLUG}/block_documents/name/{RESULTS_BLOCK}"
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return [json.loads(response.read())["id"]]
    except urllib.error.HTTPError:  # not registered yet
        return []
    except (OSError, ValueError) as exc:
        raise ServerUnreachable(f"the Prefect server at {api_url} did not answer ({exc})") from None


def _post(url: str, body: dict) -> list[dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())
    except (OSError, ValueError) as exc:
        raise ServerUnreachable(f"the Prefect server at {url.rsplit('/', 2)[0]} did not answer ({exc})") from None


def _cached_run(run: dict, ours: set[str]) -> CachedRun | None:
    state = run.get("state") or {}
    data = state.get("data") or {}
    key = data.get("storage_key") if isinstance(data, dict) else None
    if data.get("storage_block_id") not in ours or not key or not CACHE_KEY.fullmatch(key):
        return None
    when = run.get("start_time") or run.get("expected_start_time")
    return CachedRun(key, state.get("name") == "Cached", _epoch(when), float(run.get("total_run_time") or 0.0))


def _epoch(text: str | None) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() if text else 0.0


def build(runs: Iterable[CachedRun] | None, found: Scan, task: str | None = None) -> list[TaskReport]:
    """Per-task figures, busiest first; `runs` None: entries only (no server)."""
    entries = {entry.key: entry for entry in found.entries if entry.problem is None}
    reports: dict[str, TaskReport] = defaultdict(lambda: TaskReport(""))
    for entry in entries.values():
        report = reports[task_of(entry.key)]
        report.entries += 1
        report.stored_bytes += entry.size
    for name, report in reports.items():
        report.task = name
        hosts = Counter(entry.host or "?" for entry in entries.values() if task_of(entry.key) == name)
        report.hosts = hosts.most_common(TOP_HOSTS)
    if runs is not None:
        misses = _miss_seconds(runs)
        for run in runs:
            report = reports[run.task]
            report.task = run.task
            report.runs = (report.runs or 0) + 1
            report.hits = (report.hits or 0) + run.hit
            report.saved_seconds = (report.saved_seconds or 0.0) + (_saved(run, entries.get(run.key), misses) if run.hit else 0.0)
            report.bytes_served = (report.bytes_served or 0) + (entries[run.key].size if run.hit and run.key in entries else 0)
        for report in reports.values():
            if report.runs is None:
                report.runs, report.hits, report.saved_seconds, report.bytes_served = 0, 0, 0.0, 0
    chosen = [report for name, report in reports.items() if task is None or name == task]
    return sorted(chosen, key=lambda report: (-(report.runs or 0), -report.entries, report.task))


def _miss_seconds(runs: Iterable[CachedRun]) -> dict[str, float]:
    return {run.key: run.seconds for run in runs if not run.hit}


def _saved(run: CachedRun, entry: Entry | None, misses: dict[str, float]) -> float:
    """What a hit saved: the recorded computation of its entry, else the miss run seen in the
    window, less the hit's own time."""
    computed = entry.seconds if entry is not None and entry.seconds is not None else misses.get(run.key, 0.0)
    return max(computed - run.seconds, 0.0)


def _bucket(span: float) -> tuple[float, str]:
    """How finely to draw a window of `span` seconds: about a dozen to a hundred points."""
    for seconds, unit in ((300.0, "5 minutes"), (3600.0, "hour"), (86400.0, "day")):
        if span <= 100 * seconds:
            return seconds, unit
    return 7 * 86400.0, "week"


def totals(reports: list[TaskReport]) -> TaskReport:
    """The fleet's figures: the sum over tasks."""
    fleet = TaskReport("(all tasks)")
    has_runs = any(report.runs is not None for report in reports)
    fleet.runs = sum(report.runs or 0 for report in reports) if has_runs else None
    fleet.hits = sum(report.hits or 0 for report in reports) if has_runs else None
    fleet.saved_seconds = sum(report.saved_seconds or 0.0 for report in reports) if has_runs else None
    fleet.bytes_served = sum(report.bytes_served or 0 for report in reports) if has_runs else None
    fleet.entries = sum(report.entries for report in reports)
    fleet.stored_bytes = sum(report.stored_bytes for report in reports)
    hosts: Counter[str] = Counter()
    for report in reports:
        hosts.update(dict(report.hosts))
    fleet.hosts = hosts.most_common(TOP_HOSTS)
    return fleet


def draw(runs: list[CachedRun], found: Scan, since: float, path: Path, task: str | None = None) -> None:
    """A PNG of the hit rate and the time saved over the window, one line per task.

    matplotlib is optional (only this needs it): without it, `ImportError` says what to install.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = {entry.key: entry for entry in found.entries if entry.problem is None}
    misses = _miss_seconds(runs)
    now = time.time()
    bucket, unit = _bucket(now - since)
    figure, (rate_axis, saved_axis) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for name in sorted({run.task for run in runs if task is None or run.task == task}):
        buckets: dict[float, list[CachedRun]] = defaultdict(list)
        for run in runs:
            if run.task == name:
                buckets[run.when - run.when % bucket].append(run)
        times = sorted(buckets)
        stamps = [datetime.fromtimestamp(moment) for moment in times]
        rate_axis.plot(stamps, [100 * sum(r.hit for r in buckets[t]) / len(buckets[t]) for t in times], marker="o", label=name)
        saved = [sum(_saved(r, entries.get(r.key), misses) for r in buckets[t] if r.hit) for t in times]
        saved_axis.plot(stamps, saved, marker="o", label=name)
    rate_axis.set_ylabel("hit rate (%)")
    rate_axis.set_ylim(0, 105)
    saved_axis.set_ylabel(f"compute time saved (s per {unit})")
    saved_axis.set_ylim(bottom=0)
    saved_axis.set_xlim(datetime.fromtimestamp(since), datetime.fromtimestamp(now))
    rate_axis.legend(loc="best", fontsize="small")
    rate_axis.set_title("juicecache: hits and time saved, per task")
    figure.autofmt_xdate()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
