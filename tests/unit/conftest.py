"""The fast layer (`make test-fast`): no root, no FUSE, no server; a temporary folder stands
for the volume. Prefect is imported with its home in a temporary folder, never `~/.prefect`."""

from __future__ import annotations

import os

from tests.support.scratch import temporary_prefect_home

temporary_prefect_home("juicecache-unit-prefect-")
os.environ.setdefault("PREFECT_API_URL", "")
