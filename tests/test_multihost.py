"""Several machines, one cache: a storage host (Redis + SeaweedFS S3 + Prefect server) and
two client hosts A and B, each a network namespace mounting the same volume through its
own JuiceFS client, at its own path, with its own JuiceFS cache dir.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from juicecache.entries import Outcome, Remover
from juicecache.entryfile import DATA, RECORDS, write_atomically
from juicecache.volume import MountState, mount_info
from tests.conftest import force_unmount, juicefs_client_pids, wait_until
from tests.support import netns
from tests.support.cluster import Cluster, Machine, machine_env, running_cluster

pytestmark = [
    pytest.mark.multihost,
    pytest.mark.skipif(netns.unavailable_reason() is not None, reason=str(netns.unavailable_reason())),
]

MARKER_FLOW = Path(__file__).parent / "support" / "marker_flow.py"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with running_cluster(tmp_path_factory.mktemp("cluster")) as running:
        yield running


def new_inputs() -> list[str]:
    return ["shared", secrets.token_hex(4)]


def test_computed_on_a_is_a_hit_on_b(cluster: Cluster) -> None:
    values = new_inputs()
    first, first_seconds = cluster.a.demo(*values)
    second, second_seconds = cluster.b.demo(*values)

    # Process wall times include Prefect's own start-up; the run itself is what the cache saves.
    assert first["cache"] == "miss" and first["seconds"] >= 3
    assert second["cache"] == "hit" and second["seconds"] < 3 and second_seconds < first_seconds
    assert first["result"] == second["result"] and first["key"] == second["key"]
    # Same entry, reached through two different mount points.
    assert first["storage"].startswith(str(cluster.a.mount_point))
    assert second["storage"].startswith(str(cluster.b.mount_point))
    assert first["volume"] == second["volume"] == "sharedvol"


def test_concurrent_runs_on_both_hosts_compute_once(cluster: Cluster) -> None:
    values = new_inputs()
    runs = [machine.popen("-input", *values, "--json") for machine in (cluster.a, cluster.b) for _ in range(4)]
    outputs = [run.communicate(timeout=180) for run in runs]
    assert all(run.returncode == 0 for run in runs), [err for _, err in outputs]
    reports = [json.loads(stdout) for stdout, _ in outputs]
    assert [r["cache"] for r in reports].count("miss") == 1
    assert len({json.dumps(r["result"], sort_keys=True) for r in reports}) == 1


def test_task_body_runs_exactly_once(cluster: Cluster) -> None:
    """A user flow whose task leaves one marker file on the volume each time its body runs."""
    markers = f"markers-{secrets.token_hex(4)}"
    token = secrets.token_hex(4)
    runs = [
        machine.popen(str(machine.mount_point / markers), token, script=MARKER_FLOW)
        for machine in (cluster.a, cluster.b)
        for _ in range(4)
    ]
    outputs = [run.communicate(timeout=180) for run in runs]
    assert all(run.returncode == 0 for run in runs), [err for _, err in outputs]
    assert len(list((cluster.a.mount_point / markers).iterdir())) == 1
    assert {stdout.strip() for stdout, _ in outputs} == {f"value-{token}"}


def test_an_entry_replaced_on_a_is_read_new_on_b_at_once(cluster: Cluster) -> None:
    """A host must not read the entry another host has just replaced (by rename), not even
    within the kernel's lookup cache timeout: after the lock changes hands, the new holder's
    check would see the old, expired record and compute the key a second time. Both mount
    points are visible from here, so the reads follow the writes within milliseconds."""
    name = f"replaced-{secrets.token_hex(4)}"
    on_a, on_b = (machine.mount_point / "prefect-cache" / "records" / name for machine in cluster.machines)
    write_atomically(on_a, [b"version 0"])
    stale = []
    for version in range(1, 11):
        on_b.read_bytes()  # B now knows the name
        write_atomically(on_a, [f"version {version}".encode()])
        if on_b.read_bytes() != f"version {version}".encode():
            stale.append(version)
    on_a.unlink()
    assert not stale, f"host B read the replaced entry in {len(stale)} of 10 rewrites"


def test_gc_on_b_keeps_an_entry_just_rewritten_on_a(cluster: Cluster) -> None:
    """gc removes an expired entry only if its record is still the file it judged: checked
    under the key's lock, and against what the metadata engine says, not the kernel's cache."""
    key = f"rewritten-{secrets.token_hex(4)}"
    root_a, root_b = (machine.mount_point / "prefect-cache" for machine in cluster.machines)
    write_atomically(root_a / DATA / key, [b"old payload"])
    write_atomically(root_a / RECORDS / key, [b"old record"])
    judged = (root_b / RECORDS / key).stat().st_ino  # what a gc scan on B saw
    write_atomically(root_a / DATA / key, [b"new payload"])
    write_atomically(root_a / RECORDS / key, [b"new record"])
    assert Remover(root_b).remove(key, judged) is Outcome.CHANGED
    assert (root_a / RECORDS / key).read_bytes() == b"new record"


def test_killed_lock_holder_does_not_block_the_key(cluster: Cluster) -> None:
    values = new_inputs()
    holder = cluster.a.popen("-input", *values, "--json")
    locks = cluster.a.mount_point / "prefect-cache" / "locks"
    assert wait_until(lambda: _held_lock(locks), 60), "the holder never took the lock"
    holder.send_signal(signal.SIGKILL)
    holder.communicate(timeout=30)

    started = time.monotonic()
    report, _ = cluster.b.demo(*values)
    assert report["cache"] == "miss"
    assert time.monotonic() - started < 30, "the dead holder's lock blocked the key"


def test_waiter_that_gives_up_says_so(cluster: Cluster) -> None:
    """The lock is held through host A's mount by this test process, for as long as it takes."""
    from juicecache.cli import parse_value
    from juicecache.flow import cache_key
    from juicecache.locking import FlockLockManager

    values = new_inputs()
    key = cache_key([parse_value(value) for value in values])
    holder = FlockLockManager(lambda: cluster.a.mount_point / "prefect-cache" / "locks", lambda: 5.0)
    holder.acquire_lock(key, "test-holder")
    try:
        done = cluster.b.run("-input", *values, extra_env={"JUICECACHE_LOCK_TIMEOUT": "0.5"})
    finally:
        holder.release_lock(key, "test-holder")
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and f"gave up after 0.5 s waiting for the lock on cache key {key}" in lines[0], done.stderr
    assert "test-holder" in lines[0] and "Traceback" not in done.stderr


def test_mount_dying_during_a_run_fails_fast(cluster: Cluster, tmp_path: Path) -> None:
    """Its own third mount on host A, so the shared ones stay up for the other tests."""
    env = machine_env(cluster.a.env, tmp_path, "dying")
    machine = Machine(cluster.a.host, env, tmp_path)
    assert machine.run("mount", timeout=90).returncode == 0
    try:
        run = machine.popen("-input", *new_inputs())
        # Once the run holds its key's lock, the task is sleeping inside its 3 s.
        assert wait_until(lambda: _held_lock(machine.mount_point / "prefect-cache" / "locks"), 60)
        for pid in juicefs_client_pids(machine.cache_dir):
            os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        _, stderr = run.communicate(timeout=30)
        assert time.monotonic() - killed < 10
        assert run.returncode == 1
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and "transport endpoint is not connected" in lines[0], stderr
        assert mount_info(machine.mount_point).state is MountState.DEAD
        assert not Path(env["JUICECACHE_FALLBACK_DIR"]).exists()
    finally:
        force_unmount(machine.mount_point)


def test_unreachable_services_are_named_quickly(cluster: Cluster, tmp_path: Path) -> None:
    env = machine_env(cluster.a.env, tmp_path, "unreachable")
    machine = Machine(cluster.a.host, env, tmp_path)
    # Nothing listens just above the Prefect server's port (just below it, the S3 gateway's gRPC does).
    for setting, broken, expected in (
        ("JFS_META_URL", f"redis://{cluster.storage.ip}:{cluster.ports['prefect'] + 1}/1", "metadata engine unreachable"),
        ("JFS_BUCKET", f"http://{cluster.storage.ip}:{cluster.ports['prefect'] + 1}/juicecache", "object storage unreachable"),
    ):
        started = time.monotonic()
        done = machine.run("mount", extra_env={setting: broken}, timeout=60)
        assert time.monotonic() - started < 10
        assert done.returncode == 1 and expected in done.stderr and setting in done.stderr
        assert env["META_PASSWORD"] not in done.stderr + done.stdout


def _held_lock(locks: Path) -> bool:
    from juicecache.locking import FlockLockManager

    manager = FlockLockManager(lambda: locks, lambda: 0.0)
    return any(manager.is_locked(path.stem) for path in locks.glob("*.lock"))
