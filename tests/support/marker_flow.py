"""A user flow for the multi-host tests: `python marker_flow.py MARKER_DIR TOKEN [START]`.

Its cached task leaves one uniquely named file in MARKER_DIR each time its body runs
(unique names, so two bodies running at once could never hide each other), holding the
body's start and end times, then prints the value. The key is the token alone: the
marker folder differs between hosts.

START (a start gate's path, see tests/support/start_gate.py, or epoch seconds) is a start
barrier, inside the flow: the process imports everything and creates its flow run first
(Prefect's import and a busy server's flow-run creation take seconds on a loaded machine,
unevenly), then waits at it, so that
processes started one after another still look the key up at the same time. The last line
printed, {"began": EPOCH}, says when this process called the task (began its lookup).
"""

import json
import os
import secrets
import socket
import sys
import time
from pathlib import Path

# As a user's project sorts them: juicecache (third-party there) before prefect.
from juicecache import cached_task
from prefect import flow

from tests.support.start_gate import wait_for_start

# Long enough that 8 processes released by a barrier all begin before it ends, even when a
# loaded machine spreads their flow-run start-up over seconds.
WORK_SECONDS = 5.0
began: list[float] = []


@cached_task(cache_key_fn=lambda context, parameters: parameters["token"])
def expensive(token: str, marker_dir: str) -> str:
    Path(marker_dir).mkdir(exist_ok=True)
    marker = Path(marker_dir) / f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
    started = time.time()
    marker.touch()
    time.sleep(WORK_SECONDS)
    marker.write_text(json.dumps({"start": started, "end": time.time()}))
    return f"value-{token}"


@flow
def marker_flow(marker_dir: str, token: str, start: str = "0") -> str:
    wait_for_start(start)
    began.append(time.time())
    return expensive(token, marker_dir)


if __name__ == "__main__":
    print(marker_flow(sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else "0"))
    print(json.dumps({"began": began[0]}))
