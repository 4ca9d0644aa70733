"""What a test session would otherwise leave in the machine's temporary folder, and its removal.

- Prefect needs its home before it is imported: the test process gets a temporary one
  (never `~/.prefect`), removed when the process exits.
- A JuiceFS client's supervisor listens on `/tmp/fuse_fd_comm.PID` (a path fixed in JuiceFS,
  for handing the FUSE connection to an upgraded client) and removes it only when it exits
  cleanly. The fault tests kill clients, so the session removes the sockets that appeared
  while it ran and whose process is gone.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

_FUSE_SOCKET_FOLDER = Path("/tmp")  # fixed in JuiceFS, not the temporary folder's setting
_FUSE_SOCKET_PREFIX = "fuse_fd_comm."


def temporary_prefect_home(prefix: str) -> None:
    """Point Prefect in this process at a new temporary home removed at exit, unless PREFECT_HOME is set."""
    if "PREFECT_HOME" in os.environ:
        return
    home = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, home, ignore_errors=True)
    os.environ["PREFECT_HOME"] = home


def fuse_sockets() -> set[Path]:
    """The JuiceFS supervisors' sockets there are now."""
    return set(_FUSE_SOCKET_FOLDER.glob(_FUSE_SOCKET_PREFIX + "*"))


def remove_orphaned_fuse_sockets(before: set[Path]) -> None:
    """Remove the sockets not in `before` whose supervisor no longer runs."""
    for socket in fuse_sockets() - before:
        pid = socket.name.removeprefix(_FUSE_SOCKET_PREFIX)
        if pid.isdigit() and not Path("/proc", pid).exists():
            socket.unlink(missing_ok=True)
