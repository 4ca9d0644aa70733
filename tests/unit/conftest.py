"""The fast layer (`make test-fast`): no root, no FUSE, no server; a temporary folder stands
for the volume. Prefect is imported with its home in a temporary folder, never `~/.prefect`."""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="juicecache-unit-prefect-"))
os.environ.setdefault("PREFECT_API_URL", "")
