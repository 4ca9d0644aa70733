"""How many operations a small hit in a new process makes on a JuiceFS mount.

    python -m bench.fuse_ops TOKEN    (the child: one flow run, one cached task)

Counted in JuiceFS's own access log (`.accesslog` at the mount root, one line per
operation the client served, with its duration), while a new process runs one flow with
one small cached task that another process stored before. Each operation is a request from
the kernel to the JuiceFS client; a lookup, getattr or open is a metadata round trip unless
the client answers it from its own cache. Counted twice: on the mount that stored the entry
(the same host, a new process) and on the volume's second mount (another host's client).
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import sys
import time
from pathlib import Path

# The access log's own inode and the client's other virtual files: the counting, not the hit.
_VIRTUAL_INODE = re.compile(r"\((9223372032559808\d{3})[,)]")
_OPERATION = re.compile(r"\] (\w+) \(")


def count_hit_operations(env: dict[str, str], writer_mount: Path, reader_mount: Path, volume: str, token: str) -> dict:
    """Store a small entry through `writer_mount`, then count the operations of a hit through `reader_mount`.

    Returns {"total": N, "by_kind": {operation: count}}.
    """
    run = {**env, "JFS_NAME": volume}
    _child({**run, "JFS_MOUNT_POINT": str(writer_mount)}, token, expect="Completed")
    time.sleep(1.5)  # past the default 1 s caches, so that only juicecache's own mount options help
    log = subprocess.Popen(["cat", str(reader_mount / ".accesslog")], stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(0.3)
        _child({**run, "JFS_MOUNT_POINT": str(reader_mount)}, token, expect="Cached")
        time.sleep(0.5)
    finally:
        log.kill()
    lines = [line for line in log.communicate()[0].splitlines() if not _VIRTUAL_INODE.search(line)]
    kinds = collections.Counter(match.group(1) for line in lines if (match := _OPERATION.search(line)))
    return {"total": sum(kinds.values()), "by_kind": dict(sorted(kinds.items()))}


def _child(env: dict[str, str], token: str, expect: str) -> None:
    done = subprocess.run([sys.executable, "-m", "bench.fuse_ops", token], env=env, capture_output=True, text=True, timeout=300)
    if done.returncode != 0 or done.stdout.strip() != expect:
        raise RuntimeError(f"bench.fuse_ops {token}: expected {expect}, got {done.stdout.strip()!r} {done.stderr[-500:]}")


def main(token: str) -> None:
    from prefect import flow

    from bench.worker import small_result
    from juicecache import cached_task

    small = cached_task(name="bench-ops")(small_result)

    @flow
    def one_hit() -> str:
        return small(token, return_state=True).name

    print(one_hit())


if __name__ == "__main__":
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "CRITICAL")
    main(sys.argv[1])
