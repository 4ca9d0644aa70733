"""`cache report` counts exactly what a scripted sequence of runs did, on a real volume and server."""

from __future__ import annotations

import json
from pathlib import Path

from tests.support.environment import REPO, Sandbox

REPORT_FLOW = REPO / "tests" / "support" / "report_flow.py"


def runs(box: Sandbox, *calls: str) -> list[str]:
    done = box.run(*calls, script=REPORT_FLOW, extra_env={"PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


def report(box: Sandbox, *args: str) -> dict:
    done = box.run("cache", "report", "--since", "1h", *args, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_report_counts_hits_and_misses_per_task(mounted: Sandbox, tmp_path: Path) -> None:
    assert runs(mounted, "alpha:1", "alpha:1", "beta:2", "alpha:2") == ["Completed", "Cached", "Completed", "Completed"]
    assert runs(mounted, "beta:2", "alpha:1", "beta:3") == ["Cached", "Cached", "Completed"]
    found = report(mounted)
    by_task = {task["task"]: task for task in found["tasks"]}
    assert found["server"] is True
    alpha, beta = by_task["alpha"], by_task["beta"]
    assert (alpha["runs"], alpha["hits"], alpha["misses"]) == (4, 2, 2)
    assert (beta["runs"], beta["hits"], beta["misses"]) == (3, 1, 2)
    assert alpha["hit_rate"] == 0.5 and abs(beta["hit_rate"] - 1 / 3) < 1e-9
    # Each hit saves what computing its entry took (alpha sleeps 1 s, beta 0.5 s), less its own time.
    assert 2 * 0.5 < alpha["saved_seconds"] < 2 * 1.5 and 0.2 < beta["saved_seconds"] < 1.0
    assert alpha["entries"] == 2 and beta["entries"] == 2
    assert alpha["bytes_served"] > 0 and alpha["top_hosts"][0]["entries"] == 2
    # The fleet's totals are the sum over every task (the session's server also holds other tests' runs).
    fleet = found["fleet"]
    assert fleet["runs"] == sum(task["runs"] for task in found["tasks"]) >= 7
    assert fleet["hits"] == sum(task["hits"] for task in found["tasks"]) >= 3

    only = report(mounted, "--task", "beta")
    assert [task["task"] for task in only["tasks"]] == ["beta"]

    png = tmp_path / "report.png"
    drawn = report(mounted, "--png", str(png))
    assert drawn["png"] == str(png) and png.stat().st_size > 10_000
    assert png.read_bytes().startswith(b"\x89PNG")


def test_without_a_server_the_entries_alone_are_reported(mounted: Sandbox) -> None:
    assert runs(mounted, "alpha:5") == ["Completed"]
    done = mounted.run("cache", "report", "--json", extra_env={"PREFECT_API_URL": "http://127.0.0.1:9/api"})
    assert done.returncode == 0, done.stderr
    [warning] = [line for line in done.stderr.splitlines() if line.strip()]
    assert "did not answer" in warning and "entries alone" in warning
    found = json.loads(done.stdout)
    assert found["server"] is False
    [alpha] = [task for task in found["tasks"] if task["task"] == "alpha"]
    assert alpha["runs"] is None and alpha["entries"] == 1
