"""The measuring process: task-level cache timings on every backend, interleaved, in one flow run.

    python -m bench.worker CONFIG.json OUT.json

Every timed call is one task run through Prefect's real engine, as a user's flow makes it:
`cached_task` (juicecache's policy, volume storage and lock) on the folder backends, and
Prefect's own `RemoteFileSystem` through fsspec/s3fs for direct S3. Backends take turns
within each round, in a rotating order, so a burst of noise from the machine's other
users lands on all of them alike.

Prefect keeps the records a flow run wrote or read in an in-memory LRU, and juicecache
remembers the records it checked; a later run (a new process, another host) starts with
neither. So Prefect's is emptied before every timed hit, and the stores here remember no
record (`remembered_records=0`): a hit then reads the volume, as it would in the next run.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import pickle
import shutil
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

from juicecache.settings import apply_prefect_settings, load_settings

MIB = 1 << 20
CHUNK = MIB


def main(config_path: str, out_path: str) -> None:
    config = json.loads(Path(config_path).read_text())
    apply_prefect_settings(load_settings())
    logging.getLogger("juicecache").setLevel(logging.ERROR)  # the local backends "fall back" on purpose
    bench = Bench(config)
    bench.run()
    Path(out_path).write_text(json.dumps({"samples": bench.samples, "facts": bench.facts}, indent=1))


# The functions under test. Plain functions: each backend wraps them in its own task.
def small_result(token: str) -> dict[str, Any]:
    return {"token": token, "values": [1, 2, 3], "text": "a small result"}


PAYLOADS: dict[int, bytes] = {}


def blob_result(token: str, size: int) -> bytes:
    return PAYLOADS[size]


# Set by `bench.contend`: where the contended task leaves one marker file per computation.
MARKERS: dict[str, Any] = {}
CONTENDED_SECONDS = 3.0  # the demo task's pretend cost


def contended_result(token: str) -> str:
    (Path(MARKERS["folder"]) / f"computed-{token}-{os.getpid()}").touch()
    time.sleep(CONTENDED_SECONDS)
    return token


class Target:
    """One backend as this process uses it: its tasks, and how to point the cache at it."""

    def __init__(self, backend: dict[str, Any], base_settings) -> None:
        from juicecache.store import Store

        self.backend = backend
        self.slug: str = backend["slug"]
        self.is_juicefs = backend["volume_name"] is not None
        self.root = backend["root"]
        if backend["kind"] == "folder":
            mount_points = [backend["mount_point"]] + ([backend["second_mount_point"]] if backend["second_mount_point"] else [])
            # Each hit reads the volume as a new process would: no record remembered from earlier runs.
            self.stores = [Store(self._settings(base_settings, mount), remembered_records=0) for mount in mount_points]
            self.use(0)
        else:
            self.small = s3_task(small_result, "bench-small", backend)
            self.blob = s3_task(blob_result, "bench-blob", backend)
            self.contended = s3_task(contended_result, "bench-contended", backend)

    def _settings(self, base, mount_point: str):
        if self.is_juicefs:
            return replace(base, volume_name=self.backend["volume_name"], mount_point=Path(mount_point))
        # Not a JuiceFS mount: juicecache's local-folder path, pointed at this backend's folder.
        return replace(base, mount_point=Path(self.root) / "not-a-mount", fallback_dir=Path(self.root))

    def use(self, client: int = 0) -> None:
        """Run this backend's tasks through its store (client 1: the JuiceFS volume's second mount)."""
        if self.backend["kind"] == "folder":
            from juicecache.cache import cached_task

            self.store = self.stores[client]
            self.small = cached_task(name="bench-small", store=self.store)(small_result)
            self.blob = cached_task(name="bench-blob", store=self.store)(blob_result)
            self.contended = cached_task(name="bench-contended", store=self.store)(contended_result)

    def folder(self) -> Path:
        """The cache folder the tasks use now (see `use`)."""
        return self.store.resolved.location.path

    # Raw sequential I/O on the same mount (or bucket): what the storage itself can do.
    def raw_write(self, name: str, payload: bytes) -> float:
        started = time.perf_counter()
        if self.backend["kind"] == "s3":
            s3fs_filesystem(self.backend).pipe(f"{self.root}/raw/{name}", payload)
        else:
            path = Path(self.root).parent / "raw" / name
            path.parent.mkdir(exist_ok=True)
            view = memoryview(payload)
            with open(path, "wb", buffering=0) as handle:
                for offset in range(0, len(view), CHUNK):
                    handle.write(view[offset:offset + CHUNK])
                os.fsync(handle.fileno())
        return time.perf_counter() - started

    def raw_read(self, name: str) -> float:
        started = time.perf_counter()
        if self.backend["kind"] == "s3":
            s3fs_filesystem(self.backend).cat(f"{self.root}/raw/{name}")
        else:
            buffer = bytearray(CHUNK)
            with open(Path(self.root).parent / "raw" / name, "rb", buffering=0) as handle:
                while handle.readinto(buffer):
                    pass
        return time.perf_counter() - started

    def remove_blobs(self) -> None:
        """Large entries go after each round: several GiB would otherwise pile up."""
        if self.backend["kind"] == "s3":
            filesystem = s3fs_filesystem(self.backend)
            for folder in ("records", "data", "raw"):
                paths = filesystem.glob(f"{self.root}/{folder}/*")
                doomed = [p for p in paths if folder == "raw" or Path(p).name.startswith("blob-result-")]
                if doomed:
                    filesystem.rm(doomed)
            return
        for folder in ("records", "data"):
            for path in (Path(self.root) / folder).glob("blob-result-*"):
                path.unlink()
        shutil.rmtree(Path(self.root).parent / "raw", ignore_errors=True)


_filesystems: dict[str, Any] = {}


def s3fs_filesystem(backend: dict[str, Any]):
    import s3fs

    if backend["endpoint"] not in _filesystems:
        _filesystems[backend["endpoint"]] = s3fs.S3FileSystem(endpoint_url=backend["endpoint"])
    return _filesystems[backend["endpoint"]]


def s3_task(fn: Callable[..., Any], name: str, backend: dict[str, Any]):
    """What a Prefect user writes to cache straight to S3: records and results in the bucket.

    Records are kept apart from results (`key_storage`), as juicecache does, so a lookup
    reads only the small record. There is no lock manager for S3, so no isolation either.
    Credentials come from the environment (AWS_ACCESS_KEY_ID...), never from the saved block.
    """
    from prefect import task
    from prefect.cache_policies import CacheKeyFnPolicy
    from prefect.filesystems import RemoteFileSystem

    from juicecache.cache import stable_hash

    records, data = (saved_block(RemoteFileSystem, backend, folder) for folder in ("records", "data"))

    prefix = fn.__name__.replace("_", "-")  # as juicecache names its entries

    def key(context, parameters: dict[str, Any]) -> str:
        return f"{prefix}-{stable_hash(parameters)[:40]}"

    policy = CacheKeyFnPolicy(cache_key_fn=key).configure(key_storage=records)
    return task(fn, name=name, cache_policy=policy, result_storage=data, persist_result=True)


def saved_block(block_class, backend: dict[str, Any], folder: str):
    """Prefect takes task result storage only as a block saved on the server, as a user would save it."""
    name = f"bench-{Path(backend['root']).name}-{folder}"
    try:
        return block_class.load(name)
    except ValueError:
        block = block_class(basepath=f"{backend['root']}/{folder}", settings={"endpoint_url": backend["endpoint"]})
        block.save(name, overwrite=True)
        return block


class Bench:
    def __init__(self, config: dict[str, Any]) -> None:
        from juicecache.settings import load_settings

        self.config = config
        self.base = load_settings()
        self.targets = [Target(backend, self.base) for backend in config["backends"]]
        self.samples: dict[str, dict[str, list[float]]] = {}
        self.facts: dict[str, Any] = {}
        self.token = os.urandom(4).hex()
        self.counter = 0

    def new_token(self) -> str:
        self.counter += 1
        return f"{self.token}-{self.counter}"

    def record(self, metric: str, slug: str, seconds: float) -> None:
        self.samples.setdefault(metric, {}).setdefault(slug, []).append(seconds)

    def rounds(self, count: int, targets: list[Target] | None = None):
        """(round, target) in a rotating order: nobody always goes first, or last."""
        targets = targets or self.targets
        for round_ in range(count):
            shift = round_ % len(targets)
            for target in targets[shift:] + targets[:shift]:
                yield round_, target

    def run(self) -> None:
        from prefect import flow

        @flow(name="juicecache-bench", persist_result=False)
        def bench_flow() -> None:
            counts = self.config["counts"]
            phases = [
                ("small results", lambda: self.small(counts["small_miss"], counts["small_hit"])),
                ("large results", lambda: self.large(self.config["sizes_mib"], counts["large"])),
                ("second client", lambda: self.cold(counts["cold"], counts["cold_large"])),
                ("facts", self.known_facts),
            ]
            if self.config.get("scale_levels"):
                phases.append(("entries on the volume", lambda: self.scale(self.config["scale_levels"], counts["scale"])))
            for title, phase in phases:
                started = time.monotonic()
                phase()
                print(f"  [{self.config['profile']}] {title}: {time.monotonic() - started:.0f} s", flush=True)

        bench_flow()

    def call(self, task, *args: Any, expect: str) -> tuple[float, Any]:
        """One timed task run; `expect` is Prefect's state name: Completed (a miss) or Cached (a hit)."""
        from prefect.results import get_result_store

        get_result_store().cache.clear()
        started = time.perf_counter()
        state = task(*args, return_state=True)
        value = state.result()
        seconds = time.perf_counter() - started
        if state.name != expect:
            raise RuntimeError(f"{task.name}{args[:1]}: expected {expect}, got {state.name}")
        return seconds, value

    def small(self, misses: int, hits: int) -> None:
        keys = {}
        for target in self.targets:  # warm-up: one entry each, the code paths loaded
            target.use()
            keys[target.slug] = self.new_token()
            self.call(target.small, keys[target.slug], expect="Completed")
            self.call(target.small, keys[target.slug], expect="Cached")
        for _, target in self.rounds(misses):
            target.use()
            self.record("small_miss", target.slug, self.call(target.small, self.new_token(), expect="Completed")[0])
        for _, target in self.rounds(hits):
            target.use()
            self.record("small_hit", target.slug, self.call(target.small, keys[target.slug], expect="Cached")[0])
        self.entry_file(hits)

    def entry_file(self, repeats: int) -> None:
        """A small hit's file operations alone, on each folder backend: open, status, read and close one
        small entry file, with the process idle for 10 ms before each. A hit comes after the run's other
        work, so the mount's client has gone idle; back to back, it answers several times faster."""
        folders = [t for t in self.targets if t.backend["kind"] == "folder"]
        files = {}
        for target in folders:
            target.use()
            files[target.slug] = next((target.folder() / "records").glob("small-result-*"))
        for _, target in self.rounds(repeats, folders):
            time.sleep(0.01)
            started = time.perf_counter()
            descriptor = os.open(files[target.slug], os.O_RDONLY)
            os.read(descriptor, os.fstat(descriptor).st_size)  # as a hit reads: never past the end
            os.close(descriptor)
            self.record("entry_file_small", target.slug, time.perf_counter() - started)

    def large(self, sizes_mib: list[int], repeats: int) -> None:
        for mib in sizes_mib:
            size = mib * MIB
            PAYLOADS[size] = os.urandom(size)
            for _, target in self.rounds(repeats):
                target.use()
                name = f"raw-{self.new_token()}"
                self.record(f"raw_write_{mib}", target.slug, target.raw_write(name, PAYLOADS[size]))
                self.record(f"raw_read_first_{mib}", target.slug, target.raw_read(name))
                self.record(f"raw_read_{mib}", target.slug, target.raw_read(name))
                token = self.new_token()
                self.record(f"task_write_{mib}", target.slug, self.call(target.blob, token, size, expect="Completed")[0])
                seconds, value = self.call(target.blob, token, size, expect="Cached")
                self.record(f"task_read_first_{mib}", target.slug, seconds)
                self.record(f"task_read_{mib}", target.slug, self.call(target.blob, token, size, expect="Cached")[0])
                if value != PAYLOADS[size]:
                    raise RuntimeError(f"{target.slug}: a {mib} MiB hit returned other bytes")
                if target.backend["kind"] == "folder":
                    self.hit_stages(target, mib)
                    self.write_stages(target, mib)
                target.remove_blobs()
            del PAYLOADS[size]

    def hit_stages(self, target: Target, mib: int) -> None:
        """Where a large hit's time goes, timed outside Prefect on the entry the task just hit:
        its payload file read into fresh memory, then checked (BLAKE3, or the signature), then
        unpickled into the result, as the hit does them (a bytes result is read into the bytes
        object the hit returns: nothing is left to unpickle). What the task hit takes beyond
        these is Prefect's own work for a task run, a record and a result."""
        from juicecache.entryfile import DATA, read_entry
        from juicecache.serializer import RawPickleSerializer

        path = next((target.folder() / DATA).glob("blob-result-*"))
        started = time.perf_counter()
        header, content, _ = read_entry(path, bytes_pickle=True)
        read = time.perf_counter()
        target.store.resolved.signer.check(f"{DATA}/{path.name}", header, content)
        checked = time.perf_counter()
        value = RawPickleSerializer().loads(content)
        done = time.perf_counter()
        if value != PAYLOADS[mib * MIB]:
            raise RuntimeError(f"{target.slug}: its {mib} MiB entry unpickled to other bytes")
        for stage, seconds in (("read", read - started), ("check", checked - read), ("unpickle", done - checked)):
            self.record(f"hit_{stage}_{mib}", target.slug, seconds)

    def write_stages(self, target: Target, mib: int) -> None:
        """Where a large write's time goes, timed outside Prefect as the store does them: the
        result pickled, its parts hashed, the file written and fsynced beside the entries (then
        removed). What the task write takes beyond these is Prefect's, and the record's."""
        from juicecache.entryfile import DATA, write_atomically
        from juicecache.serializer import RawPickleSerializer, payload_parts

        path = target.folder() / DATA / f"blob-result-stages-{self.new_token()}"
        started = time.perf_counter()
        parts = payload_parts(RawPickleSerializer().dumps(PAYLOADS[mib * MIB]))
        pickled = time.perf_counter()
        target.store.resolved.signer.digest(f"{DATA}/{path.name}", parts)
        hashed = time.perf_counter()
        write_atomically(path, [b"{}\n", *parts])
        done = time.perf_counter()
        path.unlink()
        for stage, seconds in (("pickle", pickled - started), ("hash", hashed - pickled), ("file", done - hashed)):
            self.record(f"write_{stage}_{mib}", target.slug, seconds)

    def cold(self, repeats: int, large_repeats: int) -> None:
        """A hit on the second mount (its own cache) of an entry the first mount wrote."""
        volumes = [t for t in self.targets if t.is_juicefs]
        for _, target in self.rounds(repeats, volumes):
            token = self.new_token()
            target.use(0)
            self.call(target.small, token, expect="Completed")
            self.record("warm_hit_small", target.slug, self.call(target.small, token, expect="Cached")[0])
            target.use(1)
            self.record("cold_hit_small", target.slug, self.call(target.small, token, expect="Cached")[0])
            self.record("second_warm_hit_small", target.slug, self.call(target.small, token, expect="Cached")[0])
        size = 64 * MIB
        PAYLOADS[size] = os.urandom(size)
        for _, target in self.rounds(large_repeats, volumes):
            token = self.new_token()
            target.use(0)
            self.call(target.blob, token, size, expect="Completed")
            self.call(target.blob, token, size, expect="Cached")
            self.record("warm_hit_64", target.slug, self.call(target.blob, token, size, expect="Cached")[0])
            target.use(1)
            self.record("cold_hit_64", target.slug, self.call(target.blob, token, size, expect="Cached")[0])
            target.use(0)
            target.remove_blobs()
        del PAYLOADS[size]

    def known_facts(self) -> None:
        """What a hit reads, and what a large result costs on the volume, checked on the local folder."""
        from juicecache.entryfile import UNKEYED, Signer
        from juicecache.storage import EntryStorage

        local = self.targets[0]
        local.use()
        reads: list[str] = []
        original = EntryStorage.read_path

        def counting(storage, path, _sync=None):
            reads.append(storage.kind)
            return original(storage, path, _sync)

        token = self.new_token()
        self.call(local.small, token, expect="Completed")
        EntryStorage.read_path = counting
        try:
            self.call(local.small, token, expect="Cached")
        finally:
            EntryStorage.read_path = original
        self.facts["reads_per_hit"] = {kind: reads.count(kind) for kind in sorted(set(reads))}

        size = 64 * MIB
        PAYLOADS[size] = os.urandom(size)
        token = self.new_token()
        self.call(local.blob, token, size, expect="Completed")
        key = next((local.folder() / "data").glob("blob-result-*"))
        record = local.folder() / "records" / key.name
        self.facts["entry_64mib"] = {
            "pickle_bytes": len(pickle.dumps(PAYLOADS[size], protocol=5)),
            "data_file_bytes": key.stat().st_size,
            "record_file_bytes": record.stat().st_size,
            "serializer": json.loads(record.read_bytes().split(b"\n", 1)[1])["serializer"]["type"],
        }
        for algorithm in UNKEYED:  # the digest new entries get, then the one older entries have
            started = time.perf_counter()
            Signer().digest("data/x", PAYLOADS[size], algorithm)
            self.facts[f"{algorithm}_mib_per_s"] = 64 / (time.perf_counter() - started)
        started = time.perf_counter()
        base64.decodebytes(base64.encodebytes(PAYLOADS[size]))
        self.facts["base64_roundtrip_mib_per_s"] = 64 / (time.perf_counter() - started)
        local.remove_blobs()
        del PAYLOADS[size]

    def scale(self, levels: list[int], hits: int) -> None:
        """Hit latency with more and more entries in the cache folders.

        The filler entries are empty files: a lookup's cost depends on how many names a
        folder holds, not on what the other files contain, and empty files cost the
        backends no object uploads, so 100,000 of them take seconds, not hours.
        """
        targets = [t for t in self.targets if t.slug in ("local", "jfs-sqlite", "jfs-s3")]
        filled = 0
        folders = []
        for target in targets:
            target.use()
            folders.append(target.folder())
        for level in levels:
            started = time.monotonic()
            fill(folders, filled, level)
            self.facts.setdefault("scale_fill_seconds", {})[str(level)] = round(time.monotonic() - started, 1)
            filled = level
            probes = {}
            for target in targets:
                target.use()
                probes[target.slug] = [self.new_token() for _ in range(5)]
                for token in probes[target.slug]:
                    self.call(target.small, token, expect="Completed")
            for round_, target in self.rounds(hits, targets):
                target.use()
                token = probes[target.slug][round_ % 5]
                self.record(f"scale_hit_{level}", target.slug, self.call(target.small, token, expect="Cached")[0])


def fill(folders: list[Path], start: int, stop: int) -> None:
    """Empty filler entries `start`..`stop` in records/ and data/ of every folder at once.

    Threads, all backends together: creating a file is mostly waiting for a metadata engine.
    """

    def create(index: int) -> None:
        for folder in folders:
            for kind in ("records", "data"):
                os.close(os.open(folder / kind / f"filler-{index:08d}", os.O_WRONLY | os.O_CREAT, 0o644))

    with ThreadPoolExecutor(24) as pool:
        list(pool.map(create, range(start, stop), chunksize=64))


if __name__ == "__main__":
    main(*sys.argv[1:3])
