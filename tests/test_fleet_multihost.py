"""A fleet shares one cache (issue #12): Dask workers and `prefect worker`s on hosts A and B.

The cluster of tests/support/cluster.py (a storage host with Redis, SeaweedFS S3 and a
Prefect server; hosts A and B, network namespaces mounting the same volume at their own
paths). On it: a Dask scheduler on the storage host with one `dask worker` on A and one on
B, and a `prefect worker` on A and one on B, each started with its host's juicecache
environment. Flows are submitted, deployed and triggered from the storage host by a
process with no juicecache settings at all (tests/support/fleet_driver.py): only the hosts
that run tasks mount the volume.

The user project (tests/support/fleet_project/flows.py) leaves a marker file on the volume
each time its cached task's body runs, naming the host by its mount point (the namespaces
share a hostname), and a visit file per flow run.
"""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from juicecache.entryfile import read_header
from tests.support import netns
from tests.support.cluster import Cluster, running_cluster
from tests.support.fleet import PROJECT, Driver, fleet_env, running_services, start_dask, start_prefect_worker

pytestmark = [
    pytest.mark.multihost,
    pytest.mark.timeout(480),  # each test starts its own fleet on 2 busy cores; the cluster's start counts too
    pytest.mark.skipif(netns.unavailable_reason() is not None, reason=str(netns.unavailable_reason())),
]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    # Random secrets (the access key too), so that finding one in what the fleet logged means a leak;
    # a signing key, so entries are signed and checked with the key each host's environment holds.
    with running_cluster(
        tmp_path_factory.mktemp("fleet-cluster"), access_key=f"ak-{secrets.token_hex(6)}", signing_key=secrets.token_hex(16),
    ) as running:
        yield running


# Assertions below compare plain values only: pytest prints the parts of a failed assertion,
# and a Cluster's or Machine's repr holds the hosts' environment, secrets included.


def markers(volume: Path, run: str) -> list[tuple[int, str]]:
    """What the task bodies of `run` left on the volume: (item, host's mount point) per body execution."""
    folder = volume / run / "markers"
    records = [json.loads(path.read_text()) for path in folder.iterdir()] if folder.exists() else []
    return sorted((record["item"], record["host"]) for record in records)


def visit(volume: Path, run: str, flow_run_id: str) -> str:
    """The mount point of the host that ran flow run `flow_run_id` (the visit file it left)."""
    return json.loads((volume / run / "visits" / flow_run_id).read_text())["host"]


def missing_entries(cluster: Cluster, keys: list[str]) -> list[str]:
    """The keys whose entry (its record, which carries a small result) is not on the shared volume, and
    any host's local fallback folder: the hosts here share one filesystem, so a fallback folder would be shared too."""
    volume = cluster.b.mount_point / "prefect-cache"
    missing = []
    for key in keys:
        record = volume / "records" / key
        if not key or not record.is_file():
            missing.append(f"records/{key}")
        elif read_header(record).inline is None and not (volume / "data" / key).is_file():
            missing.append(f"data/{key}")
    fallbacks = [machine.env["JUICECACHE_FALLBACK_DIR"] for machine in cluster.machines]
    return missing + [f"fallback {folder}" for folder in fallbacks if Path(folder).exists()]


def leaked_secrets(cluster: Cluster, logs: Path, *outputs: object) -> list[str]:
    """The names of the cluster's secrets that appear in the fleet's logs or the given outputs."""
    text = "".join(path.read_text(errors="replace") for path in logs.glob("*.log")) + json.dumps(outputs, default=str)
    return [name for name, value in cluster.secrets.items() if value in text]


def test_dask_workers_on_two_hosts_share_one_cache(cluster: Cluster, tmp_path: Path) -> None:
    """8 inputs mapped over a Dask worker on A and one on B (half each, pinned by host): each
    body runs once. The same flow again, with the halves swapped: every task is a hit, each
    served by the worker of the host that did not compute it, with the computed value."""
    run = f"dask-{secrets.token_hex(4)}"
    items = list(range(1, 9))
    a, b = cluster.a.host.ip, cluster.b.host.ip
    mount_of = {a: str(cluster.a.mount_point), b: str(cluster.b.mount_point)}
    volume = cluster.a.mount_point
    with running_services(tmp_path / "logs") as services:
        fleet = start_dask(services, cluster, tmp_path)
        driver = Driver(cluster, tmp_path / "driver", services)
        first, second = driver("dask", fleet.scheduler, str(PROJECT), run, ",".join(map(str, items)), f"{a},{b}", f"{b},{a}")

    assert [outcome["item"] for outcome in first] == items
    assert [outcome["ran_on"] for outcome in first] == [[a]] * 4 + [[b]] * 4, first  # work landed on both hosts
    assert [outcome["state"] for outcome in first] == ["Completed"] * 8, first
    expected = [{"item": item, "square": item * item, "computed_on": mount_of[o["ran_on"][0]]} for item, o in zip(items, first, strict=True)]
    assert [outcome["value"] for outcome in first] == expected
    # Each body ran once (the second run added none), on the host its task was placed on.
    assert markers(volume, run) == [(value["item"], value["computed_on"]) for value in expected]

    assert [outcome["ran_on"] for outcome in second] == [[b]] * 4 + [[a]] * 4, second
    assert [outcome["state"] for outcome in second] == ["Cached"] * 8, second
    assert [outcome["value"] for outcome in second] == expected
    # Every hit was served on the host that did not compute it, through that host's own mount.
    assert all(mount_of[outcome["ran_on"][0]] != outcome["value"]["computed_on"] for outcome in second)
    keys = [outcome["key"] for outcome in first]
    assert [outcome["key"] for outcome in second] == keys and len(set(keys)) == 8
    assert missing_entries(cluster, keys) == []
    assert not (driver.path / ".juicecache").exists()  # the submitting host cached nothing, anywhere
    assert leaked_secrets(cluster, tmp_path / "logs", first, second) == []


def test_prefect_workers_on_two_hosts_share_a_deployments_cache(cluster: Cluster, tmp_path: Path) -> None:
    """One deployment from a local folder without `.env`, a process worker on A and on B (each
    polling its own queue of the pool). A run on A computes; the same run on B is all hits; a
    plain `python flows.py` on B, from another checkout path, hits those entries and computes
    a new one, which a run on A then hits: script and deployment runs share their keys."""
    token = secrets.token_hex(4)
    run, pool = f"deploy-{token}", f"fleet-{token}"
    mount_a, mount_b = str(cluster.a.mount_point), str(cluster.b.mount_point)
    volume = cluster.a.mount_point
    project = tmp_path / "project"
    shutil.copytree(PROJECT, project, ignore=shutil.ignore_patterns("__pycache__"))
    assert not (project / ".env").exists()
    with running_services(tmp_path / "logs") as services:
        # The workers start while the deployment is made (a worker creates a missing pool; the driver then finds it).
        for name, machine in zip("ab", cluster.machines, strict=True):
            start_prefect_worker(services, machine, name, pool, f"host-{name}")
        driver = Driver(cluster, tmp_path / "driver", services)
        _, on_a, on_b = driver.steps(
            ["deploy", str(project), pool, ["host-a", "host-b"]], ["run", "host-a", run, [1, 2]], ["run", "host-b", run, [1, 2]],
        )
        after_b = markers(volume, run)

        # The same task as a plain script on B, from another checkout path.
        checkout = tmp_path / "checkout-b"
        shutil.copytree(project, checkout, ignore=shutil.ignore_patterns("__pycache__"))
        script = cluster.b.host.run(
            [sys.executable, "flows.py", run, "1", "2", "3"], env=fleet_env(cluster.b), cwd=checkout,
            capture_output=True, text=True, timeout=150, stdin=subprocess.DEVNULL,
        )
        assert script.returncode == 0, script.stderr[-5000:]
        by_script = json.loads(script.stdout.strip().splitlines()[-1])
        after_script = markers(volume, run)
        script_runs, again_on_a = driver.steps(["task-runs", by_script["flow_run_id"], 3], ["run", "host-a", run, [3]])

    # A miss on A...
    assert on_a["state"] == "Completed" and on_a["work_queue"] == "host-a", on_a
    assert visit(volume, run, on_a["flow_run_id"]) == mount_a
    assert [task_run["state"] for task_run in on_a["task_runs"]] == ["Completed"] * 2, on_a
    keys = sorted(task_run["key"] for task_run in on_a["task_runs"])
    # ...is a hit on B, with the same keys, and no body ran on B.
    assert on_b["state"] == "Completed" and on_b["work_queue"] == "host-b", on_b
    assert visit(volume, run, on_b["flow_run_id"]) == mount_b
    assert [(task_run["state"], task_run["key"]) for task_run in on_b["task_runs"]] == [("Cached", key) for key in keys]
    assert after_b == [(1, mount_a), (2, mount_a)]
    # The script on B hits the deployment's entries and computes the new item...
    assert by_script["state"] == "Completed", by_script
    assert [task_run["state"] for task_run in script_runs] == ["Cached", "Cached", "Completed"], script_runs
    assert [task_run["key"] for task_run in script_runs[:2]] == keys
    new_key = script_runs[2]["key"]
    assert after_script == [(1, mount_a), (2, mount_a), (3, mount_b)]
    # ...which the deployment, run on A, then hits: script and deployment runs share their keys.
    assert again_on_a["state"] == "Completed", again_on_a
    assert visit(volume, run, again_on_a["flow_run_id"]) == mount_a
    assert [(task_run["state"], task_run["key"]) for task_run in again_on_a["task_runs"]] == [("Cached", new_key)]
    assert markers(volume, run) == after_script
    assert missing_entries(cluster, [*keys, new_key]) == []
    assert leaked_secrets(cluster, tmp_path / "logs", on_a, on_b, script.stdout, script.stderr, script_runs, again_on_a) == []
