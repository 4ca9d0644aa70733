"""A real Prefect server for the tests, the multi-host cluster and the benchmark: start, wait, stop.

Standard library only, so the benchmark (`python -m bench`) imports it without pytest or juicecache.
The health check is this harness's own, not juicecache's: a test must not wait on the code it tests.
"""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.support.processes import free_port, stop_group, wait_until

# A first start migrates the server's database: tens of seconds on a busy 2-core machine.
START_TIMEOUT = 120.0


class ServerDidNotStart(RuntimeError):
    """The server exited, or never answered; the message ends with its log's tail."""


def api_answers(api_url: str) -> bool:
    """Whether the Prefect API at `api_url` (…/api) answers its health check now."""
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


@dataclass
class PrefectServer:
    """A process in its own session serving a Prefect API at `api_url`, its output in `log`."""

    process: subprocess.Popen
    api_url: str
    log: Path

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Return once the API answers; raise ServerDidNotStart if the process ends first or `timeout` passes."""
        wait_until(lambda: api_answers(self.api_url) or self.process.poll() is not None, timeout)
        if self.process.poll() is not None or not api_answers(self.api_url):
            tail = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise ServerDidNotStart(f"the Prefect server at {self.api_url} did not start (exit code {self.process.poll()}): {tail}")

    def stop(self) -> None:
        stop_group(self.process)


def start_prefect_server(
    home: Path, env: Mapping[str, str], address: str = "127.0.0.1", port: int | None = None,
    log: Path | None = None, popen: Callable[..., subprocess.Popen] = subprocess.Popen,
) -> PrefectServer:
    """`prefect server start` on `address`:`port` (default: a free loopback port), not waiting for it.

    Its files go in `home` (its PREFECT_HOME), its output in `log` (default: `home/server.log`).
    `env` is the rest of its environment; PREFECT_API_URL is cleared so it never reports to
    another server. `popen` starts it elsewhere, e.g. a network namespace's `Host.popen`.
    """
    port = port or free_port()
    home.mkdir(parents=True, exist_ok=True)
    log = log or home / "server.log"
    env = {
        **env,
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": "",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        # Where its UI looks for the API (Prefect ignores --host/--port for that).
        "PREFECT_SERVER_API_HOST": address,
        "PREFECT_SERVER_API_PORT": str(port),
    }
    with open(log, "wb") as out:
        process = popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", address, "--port", str(port)],
            env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
    return PrefectServer(process, f"http://{address}:{port}/api", log)


@contextmanager
def running_prefect_server(home: Path, env: Mapping[str, str] = os.environ, timeout: float = START_TIMEOUT) -> Iterator[PrefectServer]:
    """A loopback Prefect server, answering, for the duration of the block; stopped after it, also on error."""
    server = start_prefect_server(home, env)
    try:
        server.wait_ready(timeout)
        yield server
    finally:
        server.stop()
