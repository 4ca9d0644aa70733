"""A Prefect server in the background, started by the first `main.py` run and reused by the next ones.

Without a server, every run starts Prefect's temporary one (seconds of a cached run's wall
time) and its runs vanish from any UI afterwards. The first demo run therefore starts
`prefect server start` on PREFECT_UI_HOST:PREFECT_UI_PORT as a detached process (logs in
`.juicecache/prefect-server.log`, its pid in `.juicecache/prefect-server.pid`); later runs
find it answering and report to it. `main.py server stop` (and `make stop`) stops it;
`main.py ui` still runs one in the foreground.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from juicecache.settings import STATE_DIR, Settings, apply_prefect_settings

# A first start migrates Prefect's database: seconds on a busy 2-core machine.
START_TIMEOUT = 90.0


class ServerUnavailable(RuntimeError):
    """No server could be started; the message is one line saying why."""


@dataclass(frozen=True)
class BackgroundServer:
    """Where the background server listens and keeps its files."""

    host: str
    port: int
    state_dir: Path

    @classmethod
    def of(cls, settings: Settings) -> BackgroundServer:
        return cls(settings.ui_host, settings.ui_port, settings.root / STATE_DIR)

    @property
    def api_url(self) -> str:
        return f"http://{self.host}:{self.port}/api"

    @property
    def ui_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def log(self) -> Path:
        return self.state_dir / "prefect-server.log"

    @property
    def pid_file(self) -> Path:
        return self.state_dir / "prefect-server.pid"

    def answers(self, timeout: float = 0.3) -> bool:
        return server_answers(self.api_url, timeout)

    def start(self, settings: Settings) -> None:
        """Start it detached and wait until it answers; `ServerUnavailable` if it cannot."""
        if _port_taken(self.host, self.port):
            raise ServerUnavailable(f"port {self.port} on {self.host} is taken by something that is not a Prefect server")
        apply_prefect_settings(settings)
        env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
        # The UI asks its server where the API is, from these two settings (see `main.py ui`).
        env.update(PREFECT_SERVER_API_HOST=self.host, PREFECT_SERVER_API_PORT=str(self.port))
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "prefect", "server", "start", "--host", self.host, "--port", str(self.port)],
                env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            )
        self.pid_file.write_text(str(process.pid))
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline and process.poll() is None:
            if self.answers(timeout=1):
                return
            time.sleep(0.3)
        self.stop()
        raise ServerUnavailable(f"the Prefect server did not start within {START_TIMEOUT:g} s (see {self.log})")

    def stop(self) -> bool:
        """Stop the server this folder started, if it runs. True if one was stopped."""
        try:
            pid = int(self.pid_file.read_text())
        except (OSError, ValueError):
            return False
        self.pid_file.unlink(missing_ok=True)
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            return False
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and _group_alive(pid):
            time.sleep(0.2)
        if _group_alive(pid):
            os.killpg(pid, signal.SIGKILL)
        return True


def server_answers(api_url: str, timeout: float) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=timeout) as response:
            return response.status == 200
    except (OSError, ValueError):
        return False


def _port_taken(host: str, port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(0.5)
        return probe.connect_ex((host, port)) == 0


def _group_alive(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
        return True
    except ProcessLookupError:
        return False
