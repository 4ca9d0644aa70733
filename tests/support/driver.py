"""tests/support/fault_driver.py run in the background on one host, its output read as it comes
(so no pipe ever fills): the fault tests' and the fleet fault tests' way of running calls."""

from __future__ import annotations

import json
import threading
from pathlib import Path

from tests.support.cluster import Machine

DRIVER = Path(__file__).parent / "fault_driver.py"


class Driver:
    """The driver running `spec` on `machine`, with `extra_env` added to the machine's environment."""

    def __init__(self, machine: Machine, spec: dict, extra_env: dict[str, str] | None = None) -> None:
        self.process = machine.popen(json.dumps(spec), script=DRIVER, extra_env=extra_env or {})
        self.lines: list[str] = []
        self.errors: list[str] = []
        self._readers = [
            threading.Thread(target=self.lines.extend, args=(self.process.stdout,), daemon=True),
            threading.Thread(target=self.errors.extend, args=(self.process.stderr,), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    @property
    def runs(self) -> list[dict]:
        """What each call reported so far, one JSON line each."""
        return [json.loads(line) for line in list(self.lines) if line.startswith("{")]

    @property
    def output(self) -> str:
        return "".join(self.lines + self.errors)

    def finish(self, timeout: float = 300, check: bool = True, outputs: list[str] | None = None) -> list[dict]:
        """Wait for it (killed if it overstays); its whole output goes to `outputs`, if given."""
        try:
            self.process.wait(timeout=timeout)
        finally:
            self.stop()
        if outputs is not None:
            outputs.append(self.output)
        if check:
            assert self.process.returncode == 0, "".join(self.errors)[-3000:]
        return self.runs

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        for reader in self._readers:
            reader.join(timeout=10)
