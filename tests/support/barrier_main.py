"""`main.py` behind a start barrier: `python barrier_main.py START BEGAN_LOG ARGS...`.

Runs `main.py ARGS` (the same `juicecache.cli.main`), but imports Prefect and the demo flow
first, waits at START (a start gate's path, see tests/support/start_gate.py, or epoch
seconds), and appends {"pid", "began"} to BEGAN_LOG
just before the run starts. Processes started one after another (Prefect's import alone
takes seconds on a busy machine) then run at the same time: what the compute-once tests
need, or they could pass one after another without any lock.
"""

import json
import os
import sys
import time
from pathlib import Path

from juicecache.cli import main
from juicecache.cli.run import prepare_prefect
from juicecache.settings import load_settings
from tests.support.start_gate import wait_for_start

ROOT = Path(__file__).resolve().parents[2]  # the checkout, as main.py passes its own folder

if __name__ == "__main__":
    start, began_log, args = sys.argv[1], sys.argv[2], sys.argv[3:]
    prepare_prefect(load_settings(ROOT))  # Prefect reads its settings at import: as main.py would, before it
    import juicecache.demo.flow  # noqa: F401  (Prefect and the demo flow: the slow imports, before the barrier)

    wait_for_start(start)
    with open(began_log, "a") as log:  # one short append: atomic between processes
        log.write(json.dumps({"pid": os.getpid(), "began": time.time()}) + "\n")
    sys.exit(main(args, root=ROOT))
