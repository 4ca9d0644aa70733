"""Shared fixtures: one real Prefect server for the session, real JuiceFS volumes per test.

Every subprocess run of `main.py` gets an isolated environment (tests/support/environment.py):
its own empty `.env`, its own volume, fallback folder and Prefect home, and `PREFECT_API_URL`
pointed at the session's server (a temporary server per process would cost 5-15 s each).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.environment import Sandbox, local_sandbox
from tests.support.prefect_server import running_prefect_server
from tests.support.scratch import fuse_sockets, remove_orphaned_fuse_sockets, temporary_prefect_home

# Tests that import Prefect in pytest's own process keep its files in a temporary folder,
# never in ~/.prefect (every run the tests start gets its own PREFECT_HOME).
temporary_prefect_home("juicecache-tests-prefect-")

# The fault suite's summary table, printed at the end of any run that includes it.
pytest_plugins = ["tests.support.fault_report"]


@pytest.fixture(scope="session", autouse=True)
def no_orphaned_fuse_sockets() -> Iterator[None]:
    """Remove the sockets of the JuiceFS clients the session killed (see tests/support/scratch.py)."""
    before = fuse_sockets()
    yield
    remove_orphaned_fuse_sockets(before)


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `prefect server start` on a free loopback port, shared by the whole session."""
    with running_prefect_server(tmp_path_factory.mktemp("prefect-home")) as server:
        yield server.api_url


@pytest.fixture
def sandbox(tmp_path: Path, prefect_api: str) -> Iterator[Sandbox]:
    """Configuration for a fresh embedded volume (not mounted yet)."""
    with local_sandbox(tmp_path, prefect_api) as box:
        yield box


@pytest.fixture
def mounted(sandbox: Sandbox) -> Sandbox:
    """A fresh embedded JuiceFS volume, formatted and mounted through `main.py mount`."""
    done = sandbox.run("mount", timeout=90)
    assert done.returncode == 0, done.stderr
    return sandbox
