"""Every way Prefect runs a flow, on one host and a real volume: pickled tasks, a process
pool, `serve`, a script and an import of the same file, nested calls, strict mode and the
visible fallback. (Several hosts, Dask workers and deployments: tests/test_fleet_multihost.py.)

Each run is its own process, as on separate machines; computations are counted by the
marker files the task body leaves (tests/support/run_shapes.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

from tests.support.environment import REPO, Sandbox
from tests.support.processes import stop_group, wait_until

SHAPES = REPO / "tests" / "support" / "run_shapes.py"
ON_PATH = {"PYTHONPATH": f"{REPO}:{SHAPES.parent}"}
AS_MODULE = "import json, sys, run_shapes; print(json.dumps(run_shapes.main(*sys.argv[1:])))"


def shape(box: Sandbox, *args: str, extra_env: dict[str, str] | None = None, ok: bool = True) -> subprocess.CompletedProcess[str]:
    done = box.run(*args, script=SHAPES, extra_env={**ON_PATH, **(extra_env or {})}, timeout=240)
    if ok:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


def last_json(done: subprocess.CompletedProcess[str]):
    return json.loads(done.stdout.splitlines()[-1])


def computations(markers: Path) -> list[str]:
    return sorted(path.name.split("-")[0] for path in markers.iterdir()) if markers.exists() else []


def api_filter(api: str, what: str, body: dict) -> list[dict]:
    request = urllib.request.Request(
        f"{api}/{what}/filter", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def task_states(api: str, flow_run_id: str) -> list[str]:
    runs = api_filter(api, "task_runs", {"flow_runs": {"id": {"any_": [flow_run_id]}}})
    return [run["state"]["name"] for run in runs]


def test_a_pickled_task_hits_in_a_fresh_process(mounted: Sandbox, tmp_path: Path) -> None:
    markers, pickled = mounted.mount_point / "markers", tmp_path / "double.pickle"
    assert last_json(shape(mounted, "pickle-out", str(markers), str(pickled), "5"))["state"] == "Completed"
    # A fresh process: the task arrives by value (it was defined in a script), its store by
    # reference, resolved from this process's own settings and mount.
    assert last_json(shape(mounted, "pickle-in", str(markers), str(pickled), "5")) == {"state": "Cached", "result": 10}
    assert computations(markers) == ["5"]


def test_process_pool_task_runner_computes_each_input_once(mounted: Sandbox) -> None:
    markers = mounted.mount_point / "markers"
    first = last_json(shape(mounted, "pool", str(markers), "1", "2", "3", "4"))
    assert first == [{"state": "Completed", "result": 2 * x} for x in (1, 2, 3, 4)]
    again = last_json(shape(mounted, "pool", str(markers), "1", "2", "3", "4"))
    assert again == [{"state": "Cached", "result": 2 * x} for x in (1, 2, 3, 4)]
    assert computations(markers) == ["1", "2", "3", "4"]


def test_a_script_run_and_an_import_share_the_key(mounted: Sandbox) -> None:
    """`python flows.py` runs module `__main__`; a deployment's entrypoint loads `flows`."""
    markers = mounted.mount_point / "markers"
    first = last_json(shape(mounted, "script", str(markers), "7"))
    assert first["state"] == "Completed"
    # On the volume: no fallback tag (the fallback test checks that it does appear).
    [run] = api_filter(mounted.env["PREFECT_API_URL"], "flow_runs", {"flow_runs": {"id": {"any_": [first["run"]]}}})
    assert "juicecache:local-fallback" not in run["tags"]
    imported = subprocess.run(
        [sys.executable, "-c", AS_MODULE, "module", str(markers), "7"], env={**mounted.env, **ON_PATH},
        capture_output=True, text=True, timeout=240, cwd=SHAPES.parent, stdin=subprocess.DEVNULL,
    )
    assert imported.returncode == 0, imported.stderr[-3000:]
    assert last_json(imported)["state"] == "Cached"
    assert computations(markers) == ["7"]


def test_the_same_task_twice_inside_a_task_or_transaction_does_not_wait_on_itself(mounted: Sandbox) -> None:
    markers = mounted.mount_point / "markers"
    timeout = 30
    done = last_json(shape(mounted, "nested", str(markers), "4", extra_env={"JUICECACHE_LOCK_TIMEOUT": str(timeout)}))
    assert done["task"] == [{"state": "Completed", "result": 8}, {"state": "Cached", "result": 8}]
    assert done["transaction"] == [{"state": "Completed", "result": 10}, {"state": "Cached", "result": 10}]
    # Waiting on its own lock would last the whole lock timeout, then fail.
    assert done["seconds"] < timeout
    assert computations(markers) == ["4", "5"]


def test_another_process_waits_for_the_computation_not_for_its_parent(mounted: Sandbox) -> None:
    """A nested cached task's entry is committed when the task ends: a concurrent reader of
    the key gets its hit while the parent task still runs."""
    markers = mounted.mount_point / "markers"
    parent = subprocess.Popen(
        [sys.executable, str(SHAPES), "hold", str(markers), "6", "12"], env={**mounted.env, **ON_PATH},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
    )
    try:
        assert wait_until(lambda: computations(markers) == ["6"], timeout=120, interval=0.05), parent.stderr
        reader = last_json(shape(mounted, "script", str(markers), "6"))
        out, err = parent.communicate(timeout=240)
    finally:
        parent.kill()
    assert parent.returncode == 0, err[-3000:]
    held = json.loads(out.splitlines()[-1])
    assert held["state"] == "Completed" and reader["state"] == "Cached" and reader["result"] == 12
    assert reader["ended"] < held["parent_ended"]
    assert computations(markers) == ["6"]


def test_served_flow_runs_share_the_cache(mounted: Sandbox) -> None:
    markers = mounted.mount_point / "markers"
    name = "fleet-serve"
    # The runner looks for scheduled runs every second (Prefect's default: every 10 s), and
    # leaves an empty `runner_storage` in its temporary folder: the sandbox's, not /tmp.
    runner = {"PREFECT_RUNNER_POLL_FREQUENCY": "1", "TMPDIR": str(mounted.path)}
    server = subprocess.Popen(
        [sys.executable, str(SHAPES), "serve", str(markers), name], env={**mounted.env, **ON_PATH, **runner},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        deployed = lambda: api_filter(mounted.env["PREFECT_API_URL"], "deployments", {"deployments": {"name": {"any_": [name]}}})  # noqa: E731
        assert wait_until(lambda: bool(deployed()) or server.poll() is not None, timeout=120), "serve never registered"
        first = last_json(shape(mounted, "trigger", str(markers), name, "9"))
        second = last_json(shape(mounted, "trigger", str(markers), name, "9"))
    finally:
        stop_group(server)
    assert first["state"] == second["state"] == "Completed"
    api = mounted.env["PREFECT_API_URL"]
    assert task_states(api, first["run"]) == ["Completed"]
    assert task_states(api, second["run"]) == ["Cached"]
    assert computations(markers) == ["9"]


def test_strict_mode_fails_fast_in_one_line(sandbox: Sandbox) -> None:
    strict = {"JUICECACHE_REQUIRE_VOLUME": "1"}
    demo = sandbox.run("-input", "1", extra_env=strict)
    assert demo.returncode == 1
    [line] = demo.stderr.strip().splitlines()
    assert "JUICECACHE_REQUIRE_VOLUME=1" in line and "not mounted" in line
    flow = shape(sandbox, "script", str(sandbox.path / "markers"), "3", extra_env=strict, ok=False)
    assert flow.returncode != 0 and "JUICECACHE_REQUIRE_VOLUME=1 forbids the local fallback" in flow.stderr
    assert computations(sandbox.path / "markers") == []
    assert not sandbox.fallback_dir.exists()


def test_the_fallback_is_visible_in_the_prefect_api(sandbox: Sandbox) -> None:
    done = shape(sandbox, "script", str(sandbox.path / "markers"), "2")
    assert "caching in the local folder" in done.stderr
    run_id = last_json(done)["run"]
    api = sandbox.env["PREFECT_API_URL"]
    [run] = api_filter(api, "flow_runs", {"flow_runs": {"id": {"any_": [run_id]}}})
    assert "juicecache:local-fallback" in run["tags"]
    artifacts = api_filter(api, "artifacts", {"artifacts": {"flow_run_id": {"any_": [run_id]}}})
    assert [artifact["key"] for artifact in artifacts] == ["juicecache-fallback"]
    assert "not mounted" in artifacts[0]["data"]
