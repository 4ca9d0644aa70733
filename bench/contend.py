"""One of N processes that ask for the same new key at the same moment, on each backend in turn.

    python -m bench.contend CONFIG.json SYNC_DIR

For each backend: say ready (a file), wait for the go file, run the task, say done with
the finishing time. The task body leaves a marker file each time it really computes;
`bench.run` counts them. Files rather than pipes: the coordinator needs nothing but a folder.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

from juicecache.settings import apply_prefect_settings, load_settings


def main(config_path: str, sync_dir: str) -> None:
    config = json.loads(Path(config_path).read_text())
    apply_prefect_settings(load_settings())
    logging.getLogger("juicecache").setLevel(logging.ERROR)
    from prefect import flow

    from bench import worker

    sync = Path(sync_dir)
    worker.MARKERS["folder"] = sync
    targets = [worker.Target(backend, load_settings()) for backend in config["backends"]]

    @flow(name="juicecache-bench-contend", persist_result=False)
    def contend() -> None:
        for target in targets:
            target.use()
            (sync / f"ready-{target.slug}-{os.getpid()}").touch()
            go = sync / f"go-{target.slug}"
            while not go.exists():
                time.sleep(0.002)
            state = target.contended(f"{config['token']}-{target.slug}", return_state=True)
            state.result()
            done = {"end": time.time(), "state": state.name}
            # Renamed into place: the coordinator reads a done file as soon as it appears.
            written = sync / f"writing-{target.slug}-{os.getpid()}"
            written.write_text(json.dumps(done))
            written.rename(sync / f"done-{target.slug}-{os.getpid()}")

    contend()


if __name__ == "__main__":
    main(*sys.argv[1:3])
