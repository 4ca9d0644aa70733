"""Several machines, one cache: the cluster that multi-host tests stand on.

A storage host (Redis + SeaweedFS S3 through `main.py stack up`, and a Prefect server)
and client hosts A and B, each a network namespace mounting the same volume through its
own JuiceFS client, at its own path, with its own JuiceFS cache dir. Every secret is a
fresh random value, so tests can look for it in whatever the cluster printed or logged.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tests.support import netns
from tests.support.environment import Sandbox, force_unmount, isolated_env
from tests.support.exec_log import ExecLog
from tests.support.prefect_server import PrefectServer, start_prefect_server
from tests.support.processes import free_ports, wait_until


class Machine(Sandbox):
    """A client host: a sandbox (the cluster's shared settings, its own paths) whose commands
    run in the host's network namespace."""

    def __init__(self, host: netns.Host, env: dict[str, str], path: Path, umask: int | None = None, python: str = sys.executable) -> None:
        super().__init__(path, env, umask, python)
        self.host = host

    def _run(self, argv: list[str], **kwargs) -> subprocess.CompletedProcess[str]:
        return self.host.run(argv, **kwargs)

    def _popen(self, argv: list[str], **kwargs) -> subprocess.Popen[str]:
        return self.host.popen(argv, **kwargs)


@dataclass
class Cluster:
    storage: netns.Host
    a: Machine
    b: Machine
    ports: dict[str, int]
    path: Path  # everything the cluster writes lives under here
    env: dict[str, str]  # the shared settings every host uses (secrets included)
    storage_env: dict[str, str]
    exec_log: ExecLog | None = None  # every juicefs/weed/redis-server command line, if asked for
    transcript: list[str] = field(default_factory=list)  # what every `stack` command printed
    others: dict[str, Machine] = field(default_factory=dict)  # client hosts beyond A and B (`extra_hosts`), by name

    @property
    def hosts(self) -> dict[str, Machine]:
        """Every client host by name: "a", "b", then any `extra_hosts`."""
        return {"a": self.a, "b": self.b, **self.others}

    @property
    def machines(self) -> tuple[Machine, Machine]:
        return (self.a, self.b)

    @property
    def stack_dir(self) -> Path:
        """Where `main.py stack up` keeps the stack's data, pid and log files."""
        return Path(self.storage_env["JUICECACHE_ROOT"]) / ".juicecache" / "stack"

    @property
    def secrets(self) -> dict[str, str]:
        names = ("META_PASSWORD", "JFS_ACCESS_KEY", "JFS_SECRET_KEY", "JUICECACHE_SIGNING_KEY")
        return {name: self.env[name] for name in names if self.env.get(name)}

    def stack(self, action: str) -> subprocess.CompletedProcess[str]:
        """`main.py stack up|down|status` on the storage host: `up` starts whatever is not running."""
        done = stack_command(self.storage, self.storage_env, action, self.exec_log)
        self.transcript.append(done.stdout + done.stderr)
        return done

    def stop_service(self, name: str, sig: signal.Signals = signal.SIGTERM, timeout: float = 30) -> None:
        """Stop one of the stack's processes ("redis", "weed" or "s3") by the pid file it left."""
        pid = int((self.stack_dir / f"{name}.pid").read_text())
        os.killpg(pid, sig)
        if sig in (signal.SIGTERM, signal.SIGKILL):
            assert wait_until(lambda: not _running(pid), timeout, interval=0.05), f"{name} did not stop"

    def resume_service(self, name: str) -> None:
        """Let a process stopped with SIGSTOP run again."""
        os.killpg(int((self.stack_dir / f"{name}.pid").read_text()), signal.SIGCONT)


def shared_env(path: Path, storage_ip: str, ports: dict[str, int], **secret_values: str) -> dict[str, str]:
    meta_url = (
        f"postgres://juicefs@{storage_ip}:{ports['postgres']}/juicefs?sslmode=disable" if "postgres" in ports
        else f"redis://{storage_ip}:{ports['redis']}/1"
    )
    return {
        **isolated_env(path),
        "JFS_NAME": "sharedvol",
        "JFS_META_URL": meta_url,
        "JFS_STORAGE": "s3",
        "JFS_BUCKET": f"http://{storage_ip}:{ports['s3']}/juicecache",
        "PREFECT_API_URL": f"http://{storage_ip}:{ports['prefect']}/api",
        **secret_values,
    }


def machine_env(base: dict[str, str], path: Path, name: str) -> dict[str, str]:
    return {
        **base,
        "JFS_MOUNT_POINT": str(path / name / f"mnt-{name}"),
        "JFS_CACHE_DIR": str(path / name / "jfs-cache"),
        "JUICECACHE_FALLBACK_DIR": str(path / name / "fallback"),
        "PREFECT_HOME": str(path / name / "prefect"),
    }


@contextmanager
def running_cluster(
    path: Path, access_key: str = "juicecache", signing_key: str = "", umask: int | None = None, log_execs: bool = False,
    extra_hosts: tuple[str, ...] = (), mount_options: dict[str, str] | None = None, postgres: bool = False,
) -> Iterator[Cluster]:
    """Start the storage host and mount the volume on A and B; tear it all down on exit, even on error.

    `log_execs`: every command juicecache starts goes through an `ExecLog` shim (the cluster's `exec_log`).
    `extra_hosts`: more client hosts ("c", ...), mounting the volume as A and B do (`Cluster.others`).
    `mount_options`: JFS_MOUNT_OPTIONS by client host name (e.g. a shorter `--heartbeat`).
    `postgres`: the PostgreSQL profile: the storage host's stack runs PostgreSQL instead of Redis,
    for JuiceFS's metadata and as the Prefect server's database (`path` must then be reachable
    by the user postgres: not under pytest's 0700 folder)."""
    secret_values = {
        "META_PASSWORD": secrets.token_hex(8),
        "JFS_ACCESS_KEY": access_key,
        "JFS_SECRET_KEY": secrets.token_hex(12),
        **({"JUICECACHE_SIGNING_KEY": signing_key} if signing_key else {}),
    }
    clients = ("a", "b", *extra_hosts)
    with netns.network(["storage", *clients]) as hosts:
        storage = hosts["storage"]
        # Free in the root namespace too: SeaweedFS also listens on unix sockets named by port.
        base = free_ports(10)
        ports = {"postgres" if postgres else "redis": base, "s3": base + 1, "prefect": base + 9}
        execs = ExecLog(path / "exec-shims") if log_execs else None
        env = shared_env(path, storage.ip, ports, **secret_values)
        if execs is not None:
            env = execs.env(env)
        storage_env = {**env, "JUICECACHE_ROOT": str(path / "storage"), "PREFECT_HOME": str(path / "storage" / "prefect")}
        if postgres:  # the stack sets the prefect role's password; the server fills it into the URL
            storage_env |= {
                "PREFECT_SERVER_DATABASE_PASSWORD": secrets.token_hex(8),
                "PREFECT_SERVER_DATABASE_CONNECTION_URL":
                    f"postgresql+asyncpg://prefect:${{PREFECT_SERVER_DATABASE_PASSWORD}}@{storage.ip}:{base}/prefect",
            }
        (path / "storage").mkdir()
        server: PrefectServer | None = None
        machines: list[Machine] = []
        transcript: list[str] = []
        try:
            up = stack_command(storage, storage_env, "up", execs)
            transcript.append(up.stdout + up.stderr)
            assert up.returncode == 0, up.stdout + up.stderr
            server = start_prefect_server(  # it starts while the hosts mount
                Path(storage_env["PREFECT_HOME"]), storage_env, storage.ip, ports["prefect"],
                log=path / "storage" / "prefect-server.log", popen=storage.popen,
            )
            for name in clients:
                options = {"JFS_MOUNT_OPTIONS": mount_options[name]} if mount_options and name in mount_options else {}
                machine = Machine(
                    hosts[name], {**machine_env(env, path, name), **options}, path / name, umask, execs.python if execs else sys.executable
                )
                machines.append(machine)
                mounted = machine.run("mount", timeout=90)
                assert mounted.returncode == 0, mounted.stderr
            # on PostgreSQL the server first runs its migrations there: slower on a busy machine
            server.wait_ready(timeout=240 if postgres else 120)
            others = dict(zip(clients[2:], machines[2:], strict=True))
            yield Cluster(storage, machines[0], machines[1], ports, path, env, storage_env, execs, transcript, others)
        finally:
            for machine in machines:
                force_unmount(machine.mount_point)
            if server is not None:
                server.stop()
            stack_command(storage, storage_env, "down", execs)
            shutil.rmtree(path, ignore_errors=True)


# The command line with JUICECACHE_ROOT as its project root (`main.py` takes its own folder),
# so the stack's data goes under the cluster's folder, not into this checkout's .juicecache.
CLI = "import sys; from juicecache.cli import main; sys.exit(main())"


def stack_command(
    storage: netns.Host, storage_env: dict[str, str], action: str, execs: ExecLog | None = None
) -> subprocess.CompletedProcess[str]:
    return storage.run(
        [execs.python if execs else sys.executable, "-c", CLI, "stack", action], env=storage_env, capture_output=True, text=True, timeout=120,
        cwd=storage_env["JUICECACHE_ROOT"],
    )


def _running(pid: int) -> bool:
    """Whether a stack process still runs (not our child: init reaps it). A Go server's main
    thread turns zombie before its other threads, which still hold its sockets, are gone."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z" or len(os.listdir(f"/proc/{pid}/task")) > 1
    except OSError:
        return False
