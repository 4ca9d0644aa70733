"""`--per-item`: each input is its own cache entry, computed concurrently, reused by later runs."""

from __future__ import annotations

from tests.support.environment import Sandbox
from tests.support.runs import run_json


def test_only_new_items_are_computed(mounted: Sandbox) -> None:
    mounted.use_default_demo_seconds()  # computations long next to a run's overhead: concurrency shows
    first = run_json(mounted, "-input", "1", "2", "3", "--per-item")
    assert first["mode"] == "per-item" and first["cache"] == "miss"
    assert [item["cache"] for item in first["items"]] == ["miss"] * 3
    # Concurrent: the run lasts about one computation, not the sum of the three.
    computing = [item["computed_seconds"] for item in first["items"]]
    assert max(computing) <= first["seconds"] < sum(computing) - max(computing) / 2
    assert first["result"] == {"count": 3, "sum": 6, "text": ""}

    second = run_json(mounted, "-input", "2", "3", "4", "--per-item")
    assert second["cache"] == "partial"
    assert [(item["input"], item["cache"]) for item in second["items"]] == [(2, "hit"), (3, "hit"), (4, "miss")]
    assert second["items"][2]["computed_seconds"] >= 3
    # Only 4 is computed: the run lasts about one computation, hits add little.
    assert second["items"][2]["computed_seconds"] <= second["seconds"] < 2 * second["items"][2]["computed_seconds"]
    assert second["result"] == {"count": 3, "sum": 9, "text": ""}
    assert second["saved_seconds"] >= 6
    assert [item["key"] for item in second["items"][:2]] == [item["key"] for item in first["items"][1:]]
    assert second["volume"] == "testvol"

    # A whole-list run of one value shares the per-item entry.
    single = run_json(mounted, "-input", "4")
    assert single["cache"] == "hit" and single["key"] == second["items"][2]["key"]

    human = mounted.run("-input", "3", "x", "--per-item")
    assert human.returncode == 0, human.stderr
    assert "per item: 1 of 2 cached" in human.stdout
    assert '{"count": 2, "sum": 3, "text": "x"}' in human.stdout
    assert "hit" in human.stdout and "miss" in human.stdout
