"""A user flow for the multi-host tests: `python marker_flow.py MARKER_DIR TOKEN`.

Its cached task leaves one uniquely named file in MARKER_DIR each time its body runs
(unique names, so two bodies running at once could never hide each other), then prints
the value. The key is the token alone: the marker folder differs between hosts.
"""

import os
import secrets
import socket
import sys
import time
from pathlib import Path

# As a user's project sorts them: juicecache (third-party there) before prefect.
from juicecache import cached_task
from prefect import flow


@cached_task(cache_key_fn=lambda context, parameters: parameters["token"])
def expensive(token: str, marker_dir: str) -> str:
    Path(marker_dir).mkdir(exist_ok=True)
    (Path(marker_dir) / f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}").touch()
    time.sleep(2)
    return f"value-{token}"


@flow
def marker_flow(marker_dir: str, token: str) -> str:
    return expensive(token, marker_dir)


if __name__ == "__main__":
    print(marker_flow(sys.argv[1], sys.argv[2]))
