"""Several machines, one cache: a storage host (Redis + SeaweedFS S3 + Prefect server) and
two client hosts A and B, each a network namespace mounting the same volume through its
own JuiceFS client, at its own path, with its own JuiceFS cache dir.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from juicecache.entryfile import DATA, RECORDS, read_header, write_atomically
from juicecache.removal import Outcome, Remover
from juicecache.volume import MountState, mount_info
from tests.support import netns
from tests.support import task_workers as workers_on
from tests.support.cluster import Cluster, Machine, machine_env, running_cluster
from tests.support.environment import REPO, force_unmount, juicefs_client_pids
from tests.support.processes import wait_until
from tests.support.start_gate import StartGate

pytestmark = [
    pytest.mark.multihost,
    pytest.mark.skipif(netns.unavailable_reason() is not None, reason=str(netns.unavailable_reason())),
]

MARKER_FLOW = Path(__file__).parent / "support" / "marker_flow.py"
BARRIER_MAIN = Path(__file__).parent / "support" / "barrier_main.py"
POLICY_FLOWS = Path(__file__).parent / "support" / "policy_flows.py"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with running_cluster(tmp_path_factory.mktemp("cluster")) as running:
        yield running


def new_inputs() -> list[str]:
    return ["shared", secrets.token_hex(4)]


def test_computed_on_a_is_a_hit_on_b(cluster: Cluster) -> None:
    values = new_inputs()
    first, _ = cluster.a.demo(*values)
    second, _ = cluster.b.demo(*values)

    # The run itself is what the cache saves (whole processes add Prefect's start-up, which a
    # loaded machine stretches by seconds either way). Relative to the miss measured here: the
    # hit skips the 3 s of work, so it takes at least 2 s less.
    assert first["cache"] == "miss" and first["seconds"] >= 3
    assert second["cache"] == "hit" and second["seconds"] < first["seconds"] - 2
    assert first["result"] == second["result"] and first["key"] == second["key"]
    # Same entry, reached through two different mount points.
    assert first["storage"].startswith(str(cluster.a.mount_point))
    assert second["storage"].startswith(str(cluster.b.mount_point))
    assert first["volume"] == second["volume"] == "sharedvol"


def test_concurrent_runs_on_both_hosts_compute_once(cluster: Cluster, tmp_path: Path) -> None:
    """8 `main.py` runs of one new key, on two hosts, started together (a barrier after their
    imports): every one looks the key up while the single computation runs, so without the
    lock each would compute it."""
    values = new_inputs()
    began_log = tmp_path / "began.jsonl"
    # Every process waits at the gate once imported: 8 Prefect imports on 2 cores take a while.
    gate = StartGate(tmp_path / "gate", 8)
    runs = [
        machine.popen(str(gate), str(began_log), "-input", *values, "--json", script=BARRIER_MAIN)
        for machine in cluster.machines for _ in range(4)
    ]
    ready = gate.open_when_ready(runs)
    outputs = [run.communicate(timeout=180) for run in runs]
    assert all(run.returncode == 0 for run in runs), [err for _, err in outputs]
    assert ready == 8, ready
    reports = [json.loads(stdout) for stdout, _ in outputs]
    assert [r["cache"] for r in reports].count("miss") == 1
    assert len({json.dumps(r["result"], sort_keys=True) for r in reports}) == 1
    # The entry is written as the computation ends: every run had begun before that.
    computed_by = cluster.a.mount_point / "prefect-cache" / "records" / reports[0]["key"]
    ended = read_header(computed_by).created
    began = [json.loads(line)["began"] for line in began_log.read_text().splitlines()]
    assert len(began) == 8 and max(began) < ended - 1, (sorted(began), ended)


def test_task_body_runs_exactly_once(cluster: Cluster, tmp_path: Path) -> None:
    """A user flow whose task leaves one marker file on the volume each time its body runs; 8
    processes on two hosts call it together (a barrier after their imports), every one before
    the single computation ended."""
    markers = f"markers-{secrets.token_hex(4)}"
    token = secrets.token_hex(4)
    # Every process waits at the gate once its flow run exists: 8 Prefect imports and flow-run creations on 2 cores take a while.
    gate = StartGate(tmp_path / "gate", 8)
    runs = [
        machine.popen(str(machine.mount_point / markers), token, str(gate), script=MARKER_FLOW)
        for machine in (cluster.a, cluster.b)
        for _ in range(4)
    ]
    ready = gate.open_when_ready(runs)
    outputs = [run.communicate(timeout=180) for run in runs]
    assert all(run.returncode == 0 for run in runs), [err for _, err in outputs]
    assert ready == 8, ready
    bodies = list((cluster.a.mount_point / markers).iterdir())
    assert len(bodies) == 1
    assert {stdout.splitlines()[0] for stdout, _ in outputs} == {f"value-{token}"}
    ended = json.loads(bodies[0].read_text())["end"]
    began = [json.loads(stdout.splitlines()[-1])["began"] for stdout, _ in outputs]
    assert max(began) < ended, (sorted(began), ended)


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


HOLD = """
import sys, time
from pathlib import Path
from juicecache.locking import FlockLockManager
FlockLockManager(lambda: Path(sys.argv[1]), lambda: 5.0).acquire_lock(sys.argv[2], "doomed-holder")
print("held", flush=True)
time.sleep(600)
"""


def test_killed_lock_holder_does_not_block_the_key(cluster: Cluster) -> None:
    """A process on host A holds a key's lock (juicecache's lock manager, as a run computing it
    would); a run of that key on host B waits for it, and computes as soon as the holder is
    SIGKILLed. Without the lock B would compute at once; with a lock that outlived its holder
    it would give up or wait for the timeout."""
    from juicecache.cli.run import parse_value
    from juicecache.demo.flow import cache_key
    from juicecache.settings import DEFAULTS

    task_seconds = float(DEFAULTS["JUICECACHE_DEMO_SECONDS"])  # the cluster's hosts keep the default

    values = new_inputs()
    key = cache_key([parse_value(value) for value in values])
    holder = cluster.a.host.popen(
        [sys.executable, "-c", HOLD, str(cluster.a.mount_point / "prefect-cache" / "locks"), key],
        env=cluster.a.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    waiter = None
    try:
        assert holder.stdout.readline().strip() == "held", holder.stderr.read()
        waiter = cluster.b.popen("-input", *values, "--json", extra_env={"JUICECACHE_LOCK_TIMEOUT": "120"})
        lock_on_b = str(cluster.b.mount_point / "prefect-cache" / "locks" / f"{key}.lock")
        assert wait_until(lambda: lock_on_b in open_files(waiter.pid) or waiter.poll() is not None, 60, 0.05)
        time.sleep(1.0)  # B is polling the lock: it must not get it while the holder lives
        assert waiter.poll() is None, waiter.communicate()
        holder.kill()
        killed = time.time()
        stdout, stderr = waiter.communicate(timeout=60)
    finally:
        holder.kill()
        holder.communicate()
        if waiter is not None and waiter.poll() is None:
            waiter.kill()
            waiter.communicate()
    assert waiter.returncode == 0, stderr
    report = json.loads(stdout)
    assert report["cache"] == "miss"
    computed = read_header(cluster.b.mount_point / "prefect-cache" / "records" / key).created
    # Computed only once the holder died (the lock held B back), and at once then (it did not outlive it).
    assert killed + task_seconds - 0.1 < computed < killed + task_seconds + 10, (killed, computed)


def open_files(pid: int) -> list[str]:
    """What process `pid` has open (paths), from /proc."""
    found = []
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                found.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
            except OSError:
                continue
    except OSError:
        pass
    return found


def test_waiter_that_gives_up_says_so(cluster: Cluster) -> None:
    """The lock is held through host A's mount by this test process, for as long as it takes."""
    from juicecache.cli.run import parse_value
    from juicecache.demo.flow import cache_key
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


def test_refresh_on_a_while_b_reads_serves_b_the_refreshed_entry(cluster: Cluster) -> None:
    """While A recomputes a key with --refresh (under another host name, so the two computations
    can be told apart), B's runs for that key are hits: on the entry as it was (a hit takes no
    lock, and the entry stays whole until the refreshed one replaces it by a rename), or on the
    refreshed one; never a half-replaced one, never a computation of their own. Once the
    refresh is stored, B reads it."""
    values = new_inputs()
    original, _ = cluster.a.demo(*values)
    assert original["cache"] == "miss"
    holder = cluster.a.mount_point / "prefect-cache" / "locks" / f"{original['key']}.lock.holder"
    first_holder = os.readlink(holder)  # left by the first computation (the record is only for people)
    renamed = ["unshare", "--uts", "sh", "-c", 'hostname refreshed && exec "$0" "$@"', sys.executable, str(REPO / "main.py")]
    refresh = cluster.a.host.popen(
        [*renamed, "-input", *values, "--refresh", "--json"], env=cluster.a.env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL, cwd=REPO,
    )
    try:
        # A names itself as the lock's holder once it has held it for a moment: it is computing.
        renamed_holder = lambda: os.path.lexists(holder) and os.readlink(holder) != first_holder  # noqa: E731
        assert wait_until(renamed_holder, timeout=60, interval=0.05), "the refresh never took the key's lock"
        readers = [cluster.b.popen("-input", *values, "--json") for _ in range(3)]
        outputs = [reader.communicate(timeout=180) for reader in readers]
        refreshed_out, refreshed_err = refresh.communicate(timeout=180)
    finally:
        refresh.kill()
    assert refresh.returncode == 0, refreshed_err
    refreshed = json.loads(refreshed_out)
    assert refreshed["cache"] == "miss" and refreshed["computed_on"] == "refreshed"
    assert all(reader.returncode == 0 for reader in readers), [err for _, err in outputs]
    reads = [json.loads(out) for out, _ in outputs]
    assert all(read["cache"] == "hit" and read["computed_on"] in (original["computed_on"], "refreshed") for read in reads), reads
    after, _ = cluster.b.demo(*values)
    assert (after["cache"], after["computed_on"]) == ("hit", "refreshed")
    assert {json.dumps(read["result"], sort_keys=True) for read in reads} == {json.dumps(original["result"], sort_keys=True)}


def test_a_plain_task_with_the_shared_policy_shares_entries_across_hosts(cluster: Cluster, tmp_path: Path) -> None:
    """`@task(cache_policy=juicecache.shared(INPUTS), result_storage=juicecache.shared_storage(), ...)`."""
    markers = str(tmp_path / "markers")  # an argument, so part of the key: the same string on both hosts
    x = str(secrets.randbelow(10**9))
    first = cluster.a.run("plain", markers, x, script=POLICY_FLOWS, extra_env={"POLICY_WORK_SECONDS": "0.5"})  # no other run overlaps it
    assert first.returncode == 0, first.stderr[-2000:]
    on_b = cluster.b.run("plain", markers, x, script=POLICY_FLOWS)
    assert on_b.returncode == 0, on_b.stderr[-2000:]
    assert json.loads(first.stdout.splitlines()[-1])["state"] == "Completed"
    reread = json.loads(on_b.stdout.splitlines()[-1])
    assert (reread["state"], reread["result"]) == ("Cached", int(x) + 300)
    assert len(list((tmp_path / "markers").iterdir())) == 1


@pytest.mark.timeout(600)  # starting two workers and up to four submissions, each bounded on its own
def test_task_workers_on_two_hosts_share_the_cache(cluster: Cluster, tmp_path: Path) -> None:
    """`task.delay(...)` (issue #18; the one-host version is tests/test_task_workers.py): a task
    worker on host A and one on host B. Six new inputs submitted from A compute once each, on
    whichever worker gets them; the same six submitted from B are all hits, and some are served
    by the host that did not compute them (reading the entry another host wrote, through its own
    mount). Each submission's parameters are written through the submitter's mount and read
    through the worker's. Each worker's whole process group is gone once the test is done."""
    token = secrets.token_hex(4)
    values = [1, 2, 3, 4, 5, 6]
    parameters_on_a = cluster.a.mount_point / "prefect-cache" / "parameters"
    earlier = set(parameters_on_a.iterdir()) if parameters_on_a.is_dir() else set()
    # One folder on the volume, seen by each host through its own mount.
    markers = {"a": cluster.a.mount_point / f"markers-{token}", "b": cluster.b.mount_point / f"markers-{token}"}

    def argv(machine: Machine) -> list[str]:
        return machine.host.argv(machine.argv(script=workers_on.WORKER_FLOW))

    def env(machine: Machine) -> dict[str, str]:
        return {**machine.env, "TASK_WORKER_TOKEN": token}

    starts = [(name, argv(machine), env(machine), markers[name]) for name, machine in (("a", cluster.a), ("b", cluster.b))]
    with workers_on.task_workers(starts, tmp_path / "logs") as workers:
        first = workers_on.outcomes(workers_on.submit(argv(cluster.a), env(cluster.a), values), workers)
        assert {x: run["value"] for x, run in first.items()} == {x: workers_on.expected(x, token) for x in values}
        assert {run["state"] for run in first.values()} == {"Completed"}, first
        bodies = workers_on.computed(markers["a"])
        assert sorted(body["x"] for body in bodies) == values, bodies
        computed_by = {body["x"]: body["worker"] for body in bodies}
        assert all(workers_on.served(markers["a"], run["task_run"])["worker"] == computed_by[x] for x, run in first.items())

        # Which worker gets a run is the server's choice: another round of the same hits
        # (at most two more) when every hit happened to go to the worker that computed it.
        crossed: list[tuple[int, str, str]] = []
        rounds = 0
        while not crossed and rounds < 3:
            rounds += 1
            again = workers_on.outcomes(workers_on.submit(argv(cluster.b), env(cluster.b), values), workers)
            assert {x: run["value"] for x, run in again.items()} == {x: workers_on.expected(x, token) for x in values}
            assert {run["state"] for run in again.values()} == {"Cached"}, again
            by = {x: workers_on.served(markers["b"], run["task_run"]) for x, run in again.items()}
            assert {record["state"] for record in by.values()} == {"Cached"}
            crossed = [(x, computed_by[x], record["worker"]) for x, record in by.items() if record["worker"] != computed_by[x]]
        assert crossed, f"in {rounds} rounds every hit was served by the worker that computed it: {computed_by}"
        assert len(workers_on.computed(markers["b"])) == len(values)  # no hit ran the body

        parameters = set(parameters_on_a.iterdir()) - earlier
        assert len(parameters) == len(values) * (1 + rounds)
    assert all(worker.process.poll() is not None for worker in workers)
    # Nothing a worker started outlived it (the cluster's mounts are unmounted at the module's end).
    assert wait_until(lambda: not any(group_alive(worker.process.pid) for worker in workers), 30, 0.1)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True
