"""A fleet on the test cluster: Dask scheduler and workers, `prefect worker`s, and a driver host.

Every process started here runs in its own session (stopped by process group) and carries
a random tag in its environment, so whatever it spawned in turn (a worker's flow-run
process starts a session of its own) is found and stopped too, and nothing else is.

Fleet hosts (Dask workers, Prefect workers) get their host's juicecache environment, plus
JUICECACHE_REQUIRE_VOLUME=1 as `.env.example` recommends for them: a host that could not
reach its volume fails instead of caching in a local folder. The driver (whoever submits
flows, deploys, or triggers runs) gets no juicecache setting at all and runs on the storage
host, which mounts nothing.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support import netns
from tests.support.cluster import Cluster, Machine
from tests.support.environment import JUICECACHE_PREFIXES
from tests.support.processes import free_port, stop_group, wait_until

TAG = "JUICECACHE_FLEET_TAG"
DRIVER = Path(__file__).parent / "fleet_driver.py"
RESULT = "fleet-driver-result:"  # the driver's answer line (fleet_driver.RESULT)
PROJECT = Path(__file__).parent / "fleet_project"
FLEET_HOST_ENV = {"JUICECACHE_REQUIRE_VOLUME": "1"}


@dataclass
class Service:
    name: str
    process: subprocess.Popen
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def running(self) -> bool:
        return self.process.poll() is None


class Services:
    """Long-running processes on the cluster's hosts, all stopped by `stop` (use `running_services`)."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.tag = secrets.token_hex(8)
        self.started: list[Service] = []

    def start(self, name: str, host: netns.Host, argv: list[str], env: dict[str, str], cwd: Path) -> Service:
        log = self.logs / f"{name}.log"
        cwd.mkdir(parents=True, exist_ok=True)
        with open(log, "wb") as out:
            process = host.popen(
                argv, env={**env, TAG: self.tag}, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=cwd, start_new_session=True,
            )
        service = Service(name, process, log)
        self.started.append(service)
        return service

    def wait_for(self, service: Service, text: str, timeout: float = 90) -> None:
        """Until `text` is in the service's output; fails (with its output) if it exits first or never says it."""
        said = wait_until(lambda: text in service.output() or not service.running(), timeout)
        assert said and service.running(), f"{service.name} did not say {text!r}:\n{service.output()[-3000:]}"

    def tagged(self) -> list[int]:
        """Every live process carrying this fleet's tag: those started here and their descendants."""
        mark = f"{TAG}={self.tag}".encode()
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                environ = (entry / "environ").read_bytes()
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if state != "Z" and mark in environ.split(b"\0"):
                found.append(int(entry.name))
        return found

    def stop(self) -> None:
        for service in reversed(self.started):
            stop_group(service.process, patience=15)
        for pid in self.tagged():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        assert wait_until(lambda: not self.tagged(), 20), f"fleet processes left running: {self.tagged()}"


@contextmanager
def running_services(logs: Path) -> Iterator[Services]:
    logs.mkdir(parents=True, exist_ok=True)
    services = Services(logs)
    try:
        yield services
    finally:
        services.stop()


def plain_env(cluster: Cluster, path: Path) -> dict[str, str]:
    """The environment of a process that knows the Prefect server and nothing of juicecache (no secrets)."""
    env = {name: value for name, value in cluster.env.items() if not name.startswith(JUICECACHE_PREFIXES)}
    # DASK_TEMPORARY_DIRECTORY: a Dask scheduler keeps a scratch folder, in /tmp unless told.
    return {**env, "PREFECT_HOME": str(path / "prefect"), "DASK_TEMPORARY_DIRECTORY": str(path / "dask")}


def fleet_env(machine: Machine, **extra: str) -> dict[str, str]:
    """A fleet host's environment: its own juicecache settings (no `.env` file), never the local fallback."""
    return {**machine.env, **FLEET_HOST_ENV, **extra}


@dataclass
class Driver:
    """Runs `fleet_driver.py` on the storage host, with no juicecache settings and from a folder without `.env`."""

    cluster: Cluster
    path: Path
    services: Services | None = None  # whose logs a failure shows

    def __call__(self, *args: str, timeout: float = 300) -> Any:
        self.path.mkdir(parents=True, exist_ok=True)
        done = self.cluster.storage.run(
            [sys.executable, str(DRIVER), *args], env=plain_env(self.cluster, self.path), cwd=self.path,
            capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
        )
        answers = [line.split(" ", 1)[1] for line in done.stdout.splitlines() if line.startswith(f"{RESULT} ")]
        if done.returncode != 0 or not answers:
            logs = "".join(f"\n--- {s.name}:\n{s.output()[-2000:]}" for s in (self.services.started if self.services else []))
            raise AssertionError(f"fleet_driver {args[0]} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}{logs}")
        return json.loads(answers[-1])

    def steps(self, *steps: list[Any]) -> list[Any]:
        return self("steps", *map(json.dumps, steps))


@dataclass
class DaskFleet:
    scheduler: str  # tcp://IP:PORT on the storage host
    workers: dict[str, Service]  # by host IP


def start_dask(services: Services, cluster: Cluster, path: Path) -> DaskFleet:
    """A scheduler on the storage host (no juicecache settings) and one `dask worker` on A and on B.

    Each worker is one process (no nanny) in its host's namespace, bound to its host's IP, with
    its host's juicecache environment: a task unpickled there resolves that host's mount.
    """
    port = free_port()
    scheduler = services.start(
        "dask-scheduler", cluster.storage,
        [sys.executable, "-m", "dask", "scheduler", "--host", cluster.storage.ip, "--port", str(port), "--no-dashboard"],
        plain_env(cluster, path / "scheduler"), path / "scheduler",
    )
    address = f"tcp://{cluster.storage.ip}:{port}"
    workers = {}  # started at once: a worker waits for its scheduler
    for name, machine in zip("ab", cluster.machines, strict=True):
        folder = machine.path / "dask-worker"
        workers[machine.host.ip] = services.start(
            f"dask-worker-{name}", machine.host,
            [
                sys.executable, "-m", "dask", "worker", address, "--host", machine.host.ip, "--name", f"fleet-{name}",
                "--nthreads", "2", "--no-nanny", "--no-dashboard", "--local-directory", str(folder),
            ],
            fleet_env(machine), folder,
        )
    services.wait_for(scheduler, "Scheduler at:")
    for worker in workers.values():
        services.wait_for(worker, "Registered to:")
    return DaskFleet(address, workers)


def start_prefect_worker(services: Services, machine: Machine, name: str, pool: str, queue: str) -> Service:
    """`prefect worker start` on `machine`, polling one queue of `pool`, with the host's environment.

    Its temporary folder is its own: Prefect's runner leaves an empty `runner_storage` in it."""
    folder = machine.path / "prefect-worker"
    (folder / "tmp").mkdir(parents=True, exist_ok=True)
    return services.start(
        f"prefect-worker-{name}", machine.host,
        [
            sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--type", "process", "--work-queue", queue,
            "--name", f"fleet-{name}",
        ],
        fleet_env(machine, PREFECT_WORKER_QUERY_SECONDS="1", TMPDIR=str(folder / "tmp")), folder,
    )

