"""The demo flow behind `python main.py -input ...`: one expensive task, cached on the volume."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Any

from prefect import Flow
from prefect.artifacts import create_markdown_artifact
from prefect.client.orchestration import get_client
from prefect.context import FlowRunContext, TaskRunContext

from juicecache.cache import active, as_timedelta, cached_task, stable_hash
from juicecache.entryfile import DATA, INLINE_MAX_BYTES, RECORDS

Value = int | float | str


class DemoFlow(Flow[..., Any]):
    """A Prefect flow whose run parameters go to the API as they are when they are plain JSON.

    Prefect converts each parameter with FastAPI's `jsonable_encoder`, and importing FastAPI
    for that costs a cached demo run 100-150 ms: nothing else in the run needs FastAPI.
    The demo's parameters (a list of numbers and words, a flag, a duration's text) are JSON
    already, and the encoder would return them unchanged: the run's parameters in the UI
    are the same. Any other value still goes through Prefect's own conversion.
    """

    def serialize_parameters(self, parameters: dict[str, Any]) -> dict[str, Any]:
        if all(_is_plain_json(value) for value in parameters.values()):
            return {name: _copy_json(value) for name, value in parameters.items()}
        return super().serialize_parameters(parameters)


def _is_plain_json(value: Any) -> bool:
    if value is None or type(value) in (bool, int, float, str):
        return True
    if type(value) is list:
        return all(_is_plain_json(item) for item in value)
    if type(value) is dict:
        return all(type(key) is str and _is_plain_json(item) for key, item in value.items())
    return False


def _copy_json(value: Any) -> Any:
    if type(value) is list:
        return [_copy_json(item) for item in value]
    if type(value) is dict:
        return {key: _copy_json(item) for key, item in value.items()}
    return value


def demo_flow_of(**options: Any) -> Callable[[Callable[..., Any]], DemoFlow]:
    """`@flow(**options)`, making a `DemoFlow`."""
    return lambda fn: DemoFlow(fn, **options)


def summarize(values: list[Value]) -> dict[str, Any]:
    """The demo's deterministic result: how many values, the sum of the numbers, the words."""
    numbers = [v for v in values if not isinstance(v, str)]
    return {
        "count": len(values),
        "sum": sum(numbers),
        "text": " ".join(v for v in values if isinstance(v, str)),
    }


def hash_values(context: TaskRunContext | None, parameters: dict[str, Any]) -> str:
    """The demo's `cache_key_fn`: the input list, in order, hashed the same on every machine."""
    return stable_hash(parameters["values"])


@cached_task(cache_key_fn=hash_values, name="compute", task_run_name="compute {values}")
def compute(values: list[Value]) -> dict[str, Any]:
    """Sleeps to stand for real work; records where and how long, so a hit can say what it saved."""
    started = time.perf_counter()
    time.sleep(active().settings.demo_seconds)
    return {
        "value": summarize(values),
        "computed_on": socket.gethostname(),
        "computed_seconds": round(time.perf_counter() - started, 3),
    }


@dataclass(frozen=True)
class RunReport:
    """What one run did, for the terminal, `--json` and the Prefect artifact."""

    inputs: list[Value]
    result: dict[str, Any]
    cache: str  # "hit" or "miss"
    key: str
    storage: str
    volume: str | None
    seconds: float
    saved_seconds: float
    computed_on: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def cache_key(values: list[Value]) -> str:
    """The key `compute` will use for these values (the same policy, called directly)."""
    key = compute.cache_policy.compute_key(task_ctx=None, inputs={"values": values}, flow_parameters={})
    assert key is not None
    return key


@demo_flow_of(name="juicecache-demo", flow_run_name="inputs {values}", persist_result=False, log_prints=False)
def demo_flow(values: list[Value], refresh: bool = False, expire: str | None = None) -> RunReport:
    """Run `compute` through the cache and leave an artifact saying what the cache did."""
    cache = active()
    started = time.perf_counter()
    options: dict[str, Any] = {"refresh_cache": True} if refresh else {}
    expiration: timedelta | None = as_timedelta(expire)
    if expiration is not None:
        options["cache_expiration"] = expiration
    state = compute.with_options(**options)(values, return_state=True)
    outcome = state.result()
    seconds = time.perf_counter() - started
    hit = state.name == "Cached"
    key = cache_key(values)
    report = RunReport(
        inputs=values,
        result=outcome["value"],
        cache="hit" if hit else "miss",
        key=key,
        storage=str(cache.location.path / RECORDS / key),
        volume=cache.location.volume_name,
        seconds=round(seconds, 3),
        saved_seconds=round(max(outcome["computed_seconds"] - seconds, 0.0), 3) if hit else 0.0,
        computed_on=outcome["computed_on"],
    )
    create_markdown_artifact(
        markdown=artifact_markdown(report),
        key="juicecache-cache",
        description=artifact_description(report),
    )
    tag_flow_run(*run_tags(report))
    return report


def run_tags(report: RunReport) -> list[str]:
    """Tags that let the UI find runs by project, by cache outcome and by the volume used."""
    return ["juicecache", f"cache:{report.cache}", f"volume:{report.volume or 'none'}"]


def tag_flow_run(*labels: str) -> None:
    """Add tags to the running flow run, through the API: the outcome is known only after the
    task ran. (Tags on the task run itself would cost every hit a round trip: Prefect checks
    tag concurrency limits for tagged tasks.)"""
    run = FlowRunContext.get().flow_run
    with get_client(sync_client=True) as client:
        client.update_flow_run(run.id, tags=sorted({*run.tags, *labels}))


def artifact_description(report: RunReport) -> str:
    """The one line the UI shows on the artifact's card."""
    if report.cache == "hit":
        return f"cache hit: read in {report.seconds:.3f} s, saved {report.saved_seconds:.1f} s"
    return f"cache miss: computed in {report.seconds:.3f} s"


def artifact_markdown(report: RunReport) -> str:
    where = f"JuiceFS volume `{report.volume}`" if report.volume else "local folder (volume not mounted: not shared)"
    return "\n".join(
        [
            f"## juicecache: cache **{report.cache}**",
            "",
            "| | |",
            "|---|---|",
            f"| inputs | `{report.inputs}` |",
            f"| key | `{report.key}` |",
            f"| cache | **{report.cache}** |",
            f"| where | {where} |",
            f"| record | `{report.storage}` |",
            f"| payload | inside the record if it pickles to {INLINE_MAX_BYTES // 1024} KiB or less, else in `{DATA}/` beside `{RECORDS}/` |",
            f"| computed on | `{report.computed_on}` |",
            f"| this run | {report.seconds:.3f} s |",
            f"| time saved | {report.saved_seconds:.3f} s |",
            "",
            "This task's hit rate and time saved across the fleet: `juicecache cache report --task compute`.",
        ]
    )


@dataclass(frozen=True)
class ItemReport:
    """One input of a per-item run: its own cache entry, hit or miss."""

    input: Value
    cache: str
    key: str
    computed_on: str
    computed_seconds: float


@dataclass(frozen=True)
class PerItemReport:
    """What a `--per-item` run did: the combined result, and each input's entry."""

    inputs: list[Value]
    result: dict[str, Any]
    cache: str  # "hit" (every item), "miss" (every item) or "partial"
    items: list[ItemReport]
    volume: str | None
    seconds: float
    saved_seconds: float

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "mode": "per-item"}


def combine(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-item summaries merged into what `summarize` gives for the whole list."""
    return {
        "count": sum(part["count"] for part in summaries),
        "sum": sum(part["sum"] for part in summaries),
        "text": " ".join(part["text"] for part in summaries if part["text"]),
    }


@demo_flow_of(name="juicecache-per-item", flow_run_name="per item {values}", persist_result=False, log_prints=False)
def per_item_flow(values: list[Value], refresh: bool = False, expire: str | None = None) -> PerItemReport:
    """`compute` mapped over one-value lists, run concurrently: each input is its own entry.

    A later run that shares some inputs computes only the new ones. The entries are the
    ones a whole-list run of a single value uses (`-input 4` and `-input 2 4 --per-item`
    share the entry of 4).
    """
    cache = active()
    started = time.perf_counter()
    options: dict[str, Any] = {"refresh_cache": True} if refresh else {}
    expiration = as_timedelta(expire)
    if expiration is not None:
        options["cache_expiration"] = expiration
    futures = compute.with_options(**options).map([[value] for value in values])
    futures.wait()
    outcomes = [future.result() for future in futures]
    items = [
        ItemReport(
            input=value,
            cache="hit" if future.state.name == "Cached" else "miss",
            key=cache_key([value]),
            computed_on=outcome["computed_on"],
            computed_seconds=outcome["computed_seconds"],
        )
        for value, future, outcome in zip(values, futures, outcomes, strict=True)
    ]
    kinds = {item.cache for item in items}
    report = PerItemReport(
        inputs=values,
        result=combine([outcome["value"] for outcome in outcomes]),
        cache=kinds.pop() if len(kinds) == 1 else "partial",
        items=items,
        volume=cache.location.volume_name,
        seconds=round(time.perf_counter() - started, 3),
        saved_seconds=round(sum(item.computed_seconds for item in items if item.cache == "hit"), 3),
    )
    create_markdown_artifact(markdown=per_item_markdown(report), key="juicecache-cache")
    return report


def per_item_markdown(report: PerItemReport) -> str:
    rows = [f"| `{item.input!r}` | **{item.cache}** | `{item.key}` | `{item.computed_on}` |" for item in report.items]
    return "\n".join(
        [
            f"## juicecache: per-item run, cache **{report.cache}**",
            "",
            "| input | cache | key | computed on |",
            "|---|---|---|---|",
            *rows,
            "",
            f"This run: {report.seconds:.3f} s; computation saved: {report.saved_seconds:.3f} s.",
        ]
    )
