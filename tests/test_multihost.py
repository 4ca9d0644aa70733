"""Several machines, one cache: a storage host (Redis + SeaweedFS S3 + Prefect server) and
two client hosts A and B, each a network namespace mounting the same volume through its
own JuiceFS client, at its own path, with its own JuiceFS cache dir.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from juicecache.stack import free_ports
from juicecache.volume import MountState, mount_info
from tests.conftest import MAIN, REPO, force_unmount, juicefs_client_pids, wait_until
from tests.support import netns

pytestmark = [
    pytest.mark.multihost,
    pytest.mark.skipif(netns.unavailable_reason() is not None, reason=str(netns.unavailable_reason())),
]

MARKER_FLOW = Path(__file__).parent / "support" / "marker_flow.py"


@dataclass
class Machine:
    """A client host with its juicecache environment (the same shared .env, its own paths)."""

    host: netns.Host
    env: dict[str, str]
    path: Path

    @property
    def mount_point(self) -> Path:
        return Path(self.env["JFS_MOUNT_POINT"])

    @property
    def cache_dir(self) -> Path:
        return Path(self.env["JFS_CACHE_DIR"])

    def argv(self, *args: str, script: Path = MAIN) -> list[str]:
        return [sys.executable, str(script), *args]

    def run(self, *args: str, timeout: float = 120, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        try:
            return self.host.run(
                self.argv(*args), env={**self.env, **(extra_env or {})}, capture_output=True, text=True,
                timeout=timeout, stdin=subprocess.DEVNULL, cwd=REPO,
            )
        except subprocess.TimeoutExpired as expired:
            pytest.fail(f"{' '.join(args)} on {self.host.name} timed out; stderr: {expired.stderr!r}")

    def popen(self, *args: str, script: Path = MAIN, extra_env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        return self.host.popen(
            self.argv(*args, script=script), env={**self.env, **(extra_env or {})},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL, cwd=REPO,
        )

    def demo(self, *values: str, extra_env: dict[str, str] | None = None) -> tuple[dict, float]:
        started = time.monotonic()
        done = self.run("-input", *values, "--json", extra_env=extra_env)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout), time.monotonic() - started


@dataclass
class Cluster:
    storage: netns.Host
    a: Machine
    b: Machine
    ports: dict[str, int]


def shared_env(path: Path, storage_ip: str, ports: dict[str, int], password: str, secret_key: str) -> dict[str, str]:
    env_file = path / "shared.env"
    env_file.write_text("")
    inherited = {k: v for k, v in os.environ.items() if not k.startswith(("JFS_", "JUICECACHE_", "PREFECT_", "META_"))}
    return {
        **inherited,
        "JUICECACHE_ENV_FILE": str(env_file),
        "PYTHONPATH": str(REPO),
        "JFS_NAME": "sharedvol",
        "JFS_META_URL": f"redis://{storage_ip}:{ports['redis']}/1",
        "META_PASSWORD": password,
        "JFS_STORAGE": "s3",
        "JFS_BUCKET": f"http://{storage_ip}:{ports['s3']}/juicecache",
        "JFS_ACCESS_KEY": "juicecache",
        "JFS_SECRET_KEY": secret_key,
        "PREFECT_API_URL": f"http://{storage_ip}:{ports['prefect']}/api",
    }


def machine_env(base: dict[str, str], path: Path, name: str) -> dict[str, str]:
    return {
        **base,
        "JFS_MOUNT_POINT": str(path / name / f"mnt-{name}"),
        "JFS_CACHE_DIR": str(path / name / "jfs-cache"),
        "JUICECACHE_FALLBACK_DIR": str(path / name / "fallback"),
        "PREFECT_HOME": str(path / name / "prefect"),
    }


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    path = tmp_path_factory.mktemp("cluster")
    password, secret_key = secrets.token_hex(8), secrets.token_hex(12)
    with netns.network(["storage", "a", "b"]) as hosts:
        storage = hosts["storage"]
        # Free in the root namespace too: SeaweedFS also listens on unix sockets named by port.
        base = free_ports(11)
        # SeaweedFS takes s3..s3+7; nothing listens on "closed".
        ports = {"redis": base, "s3": base + 1, "prefect": base + 9, "closed": base + 10}
        env = shared_env(path, storage.ip, ports, password, secret_key)
        storage_env = {**env, "JUICECACHE_ROOT": str(path / "storage"), "PREFECT_HOME": str(path / "storage" / "prefect")}
        (path / "storage").mkdir()
        server = None
        machines: list[Machine] = []
        try:
            up = storage.run([sys.executable, str(MAIN), "stack", "up"], env=storage_env, capture_output=True, text=True, timeout=120, cwd=REPO)
            assert up.returncode == 0, up.stdout + up.stderr
            server = storage.popen(
                [sys.executable, "-m", "prefect", "server", "start", "--host", storage.ip, "--port", str(ports["prefect"])],
                env={**storage_env, "PREFECT_API_URL": ""}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            for name in ("a", "b"):
                machine = Machine(hosts[name], machine_env(env, path, name), path / name)
                machines.append(machine)
                mounted = machine.run("mount", timeout=90)
                assert mounted.returncode == 0, mounted.stderr
            health = [sys.executable, "-c", f"import urllib.request; urllib.request.urlopen('{env['PREFECT_API_URL']}/health', timeout=1)"]
            assert wait_until(lambda: hosts["a"].run(health, capture_output=True).returncode == 0, timeout=120)
            yield Cluster(storage, machines[0], machines[1], ports)
        finally:
            for machine in machines:
                force_unmount(machine.mount_point)
            if server is not None:
                os.killpg(server.pid, signal.SIGTERM)
                server.wait(timeout=30)
            storage.run([sys.executable, str(MAIN), "stack", "down"], env=storage_env, capture_output=True, timeout=120, cwd=REPO)
            shutil.rmtree(path, ignore_errors=True)


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
    for setting, broken, expected in (
        ("JFS_META_URL", f"redis://{cluster.storage.ip}:{cluster.ports['closed']}/1", "metadata engine unreachable"),
        ("JFS_BUCKET", f"http://{cluster.storage.ip}:{cluster.ports['closed']}/juicecache", "object storage unreachable"),
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
