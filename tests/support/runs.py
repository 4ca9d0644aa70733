"""What several test modules do with a sandbox: run a user's flow, a `--json` command or
`volume_status()`, check a one-line error, and read back what the runs left on the volume.

Test modules import these from here, never from one another.
"""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime
from pathlib import Path

from tests.support.environment import REPO, Sandbox

USER_FLOW = REPO / "tests" / "support" / "user_flow.py"
# The scripts import juicecache from this checkout, as a user's project imports the installed one.
ON_PATH = {"PYTHONPATH": str(REPO)}

STATUS = """
import json, sys
import juicecache
status = juicecache.volume_status()
print(json.dumps({
    "mounted": status.mounted, "volume": status.volume_name, "mount_point": str(status.mount_point),
    "results": str(status.results_path), "warning": status.warning,
    "settings_volume": juicecache.get_settings().volume_name, "prefect_imported": "prefect" in sys.modules,
    "public": sorted(name for name in juicecache.__all__ if getattr(juicecache, name, None) is not None),
}))
"""


def run_flow(box: Sandbox, *calls: tuple[str, list, dict]) -> list[dict]:
    """`tests/support/user_flow.py` with `calls` (task name, args, kwargs): each call's outcome."""
    done = box.run(json.dumps(calls), script=USER_FLOW, extra_env=ON_PATH)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


def run_json(box: Sandbox, *args: str) -> dict:
    """`main.py *args --json`, which must succeed: what it reported."""
    done = box.run(*args, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def volume_status(box: Sandbox) -> dict:
    """`juicecache.volume_status()` in a fresh process with the sandbox's settings."""
    done = subprocess.run(
        [sys.executable, "-c", STATUS], env={**box.env, **ON_PATH}, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def assert_one_line_error(done: subprocess.CompletedProcess[str], *fragments: str) -> None:
    """A failure a person can act on: non-zero, one line on stderr holding every fragment, no traceback."""
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def cache_folder(box: Sandbox) -> Path:
    """The cache's root on the sandbox's volume."""
    return box.mount_point / "prefect-cache"


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp).astimezone().isoformat(timespec="seconds")


def listing_from_files(box: Sandbox) -> list[dict]:
    """What `cache ls --json` must list ("expired" aside), read straight from the entry files
    (header line, record body, payload size) without juicecache's scan or listing index; by key."""
    root = cache_folder(box)
    found = []
    for record in (root / "records").iterdir():
        raw = record.read_bytes()
        line, body = raw.split(b"\n", 1)
        header = json.loads(line.removeprefix(b"JCE1 "))
        carried = header.get("inline")  # a small result's payload, at the end of its record
        metadata = json.loads(body if carried is None else body[: len(body) - carried])
        payload_bytes = 0 if carried is not None else (root / "data" / metadata["storage_key"]).stat().st_size
        expiration = metadata.get("expiration")
        found.append({
            "key": record.name, "task": header["task"], "host": header["host"], "created": _iso(header["created"]),
            "expires": _iso(datetime.fromisoformat(expiration).timestamp()) if expiration else None,
            "size": len(raw) + payload_bytes, "problem": None,
            "code": header.get("code"), "seconds": header.get("seconds"),
        })
    return sorted(found, key=lambda entry: entry["key"])


def without_expired(entries) -> list[dict]:
    return sorted(({k: v for k, v in entry.items() if k != "expired"} for entry in entries), key=lambda entry: entry["key"])
