"""Faults of whole hosts, and the chaos soak that mixes them (tests/test_fleet_faults.py, `make chaos`).

Host faults act on the real processes of one client host of the test cluster: its JuiceFS
client (supervisor and FUSE server) killed or frozen, its network link taken down inside
its namespace. The soak runs cached-task calls on every host (tests/support/fault_driver.py
children, forked by one zygote per host) while it injects faults at random, then checks
every run, every computation and every entry file left on the volume:

- 0 wrong values: every run that returned a value returned the one its key determines;
- 0 unreadable entries: every entry file on the volume passes its header and checksum (or
  signature) check, after every fault and at the end, and no run had an entry refused;
- computations per key per expiry: a key computed again before its previous entry expired
  is explained (the previous computation stored nothing: its run was killed, failed or
  warned that the store failed; or a documented takeover: the previous computing host's
  JuiceFS session was lost, killed, frozen or cut off, so its lock went with it), else it
  counts as unexplained, and the full soak (`make chaos`) fails; `make test`'s short one reports it;
- errors, by kind.
"""

from __future__ import annotations

import collections
import json
import os
import random
import re
import secrets
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from juicecache.entryfile import DATA, RECORDS, TEMP_PREFIX, EntryHeader, EntryRefused, Signer
from tests.conftest import force_unmount, juicefs_client_pids, wait_until
from tests.support.cluster import Cluster, Machine

DRIVER = Path(__file__).parent / "fault_driver.py"
RESULTS = "prefect-cache"
# The drivers' own console stays quiet; fleet hosts never fall back to a local folder (see .env.example).
QUIET = {"PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "WARNING", "JUICECACHE_REQUIRE_VOLUME": "1"}


# -- host faults ------------------------------------------------------------------------------


def client_pids(machine: Machine) -> list[int]:
    return juicefs_client_pids(machine.cache_dir)


def kill_client(machine: Machine) -> None:
    """SIGKILL the host's whole JuiceFS client (supervisor and FUSE server): its mount is left dead."""
    pids = client_pids(machine)
    assert pids, f"no JuiceFS client found for {machine.mount_point}"
    for pid in pids:
        _signal(pid, signal.SIGKILL)
    assert wait_until(lambda: not any(_alive(pid) for pid in pids), 30, 0.05), "the JuiceFS client survived SIGKILL"


def freeze_client(machine: Machine) -> list[int]:
    pids = client_pids(machine)
    assert pids, f"no JuiceFS client found for {machine.mount_point}"
    for pid in pids:
        _signal(pid, signal.SIGSTOP)
    return pids


def thaw_client(pids: list[int]) -> None:
    for pid in pids:
        _signal(pid, signal.SIGCONT)


def remount(machine: Machine) -> None:
    """Detach a dead mount (forced) and mount the volume again, as an operator would."""
    force_unmount(machine.mount_point)
    done = machine.run("mount", timeout=180)
    assert done.returncode == 0, done.stderr


def set_link(machine: Machine, up: bool) -> None:
    """`ip link set eth0 up|down` inside the host's network namespace (through nsenter)."""
    machine.host.run(["ip", "link", "set", machine.host.ifname, "up" if up else "down"], check=True, capture_output=True)


def _signal(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


# -- entries and keys ------------------------------------------------------------------------


def entry_problems(root: Path, signing_key: str = "") -> tuple[list[str], int]:
    """Every entry file a reader can see (records and payloads, not temporaries) that fails its
    header or checksum/signature check, and how many were checked."""
    signer = Signer(signing_key.encode())
    problems, checked = [], 0
    for kind in (RECORDS, DATA):
        folder = root / kind
        for path in sorted(folder.iterdir()) if folder.is_dir() else []:
            if path.name.startswith(TEMP_PREFIX) or path.name.endswith(".json"):
                continue
            try:
                with open(path, "rb") as handle:
                    header = EntryHeader.from_line(handle.readline())
                    signer.check(f"{kind}/{path.name}", header, handle.read())
                checked += 1
            except FileNotFoundError:  # replaced or collected between the listing and the open
                continue
            except EntryRefused as refused:
                problems.append(f"{kind}/{path.name}: {refused}")
    return problems, checked


def cache_key_of(user_key: str) -> str:
    """The cache key (entry and lock file name) fault_driver's task uses for `user_key`."""
    from tests.support.fault_driver import work

    return work.cache_policy.cache_key_fn(None, {"key": user_key, "payload_bytes": 0, "work_seconds": 0, "markers": ""})


def markers(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


# -- the soak ----------------------------------------------------------------------------------


class Zygote:
    """fault_driver.py --zygote on one host: forks a fresh driver process per spec, cheaply."""

    def __init__(self, machine: Machine, extra_env: dict[str, str]) -> None:
        import subprocess

        self.process = machine.popen("--zygote", script=DRIVER, extra_env={**QUIET, **extra_env}, stdin=subprocess.PIPE)
        self.lines: list[dict] = []
        self.errors: list[str] = []
        self.children: dict[int, float] = {}  # pid: when forked
        self._forked = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self.errors.extend, args=(self.process.stderr,), daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            try:
                parsed = json.loads(line)
            except ValueError:
                continue
            with self._forked:
                self.lines.append(parsed)
                if "child" in parsed:
                    self.children[parsed["child"]] = time.time()
                self._forked.notify_all()

    def fork(self, spec: dict, timeout: float = 120) -> int:
        with self._forked:
            known = len(self.children)
            self.process.stdin.write(json.dumps(spec) + "\n")
            self.process.stdin.flush()
            assert self._forked.wait_for(lambda: len(self.children) > known or self.process.poll() is not None, timeout), "zygote silent"
            assert self.process.poll() is None, "".join(self.errors)[-2000:]
            return list(self.children)[known]

    def live(self) -> list[int]:
        return [pid for pid in list(self.children) if _alive(pid)]

    def runs(self) -> list[dict]:
        return [line for line in list(self.lines) if "state" in line]

    def close(self) -> None:
        try:
            self.process.stdin.close()
        except OSError:
            pass
        try:
            self.process.wait(timeout=30)
        except Exception:
            self.process.kill()
            self.process.wait()


@dataclass
class Fault:
    kind: str
    host: str | None
    start: float
    end: float = 0.0
    detail: str = ""


@dataclass
class SoakConfig:
    seconds: float
    keys: int = 30
    processes: int = 4  # per host
    expire: float = 10.0
    work_seconds: float = 0.4
    pace: float = 1.0
    payload_bytes: int = 4096
    session_expiry: float = 15.0  # 5 x the hosts' --heartbeat
    quiet: tuple[float, float] = (4.0, 8.0)  # seconds between one fault's recovery and the next fault
    seed: int = field(default_factory=lambda: secrets.randbits(32))


KINDS = ("killed runs", "client killed", "client frozen", "Redis restarted", "S3 stopped", "host partitioned")


@dataclass
class SoakResult:
    config: SoakConfig
    hosts: list[str]
    faults: list[Fault]
    runs: list[dict]
    computations: list[dict]
    killed_children: int
    overran: int
    wrong: list[dict]
    unreadable: list[str]
    refused: list[dict]
    checked_entries: int
    scans: int
    duplicates: dict[str, list[tuple[dict, dict]]]
    errors: collections.Counter
    warnings: collections.Counter
    final_runs: list[dict]
    wall: float
    started: float = 0.0

    def explain(self, pair: tuple[dict, dict]) -> str:
        """One recomputation within an expiry, in full: both computations, their runs, the faults then."""
        t = self.started
        lines = []
        for m in pair:
            run = [r for r in self.runs if r["pid"] == m["pid"] and r["key"] == m["key"] and r["start"] <= m["start"] <= r["end"]]
            shown = [(r["state"], r["value_ok"], r["warnings"], r["error"], round(r["end"] - t, 2)) for r in run]
            lines.append(f"{m['key']} on {m['client']} pid {m['pid']}: {m['start'] - t:.2f}-{m['end'] - t:.2f} s; run {shown}")
        lines += [f"fault {f.kind} {f.host or ''} {f.start - t:.1f}-{f.end - t:.1f} s {f.detail}" for f in self.faults]
        return "\n".join(lines)

    @property
    def unexplained(self) -> list[tuple[dict, dict]]:
        return self.duplicates.get("unexplained", [])

    def summary_lines(self) -> list[str]:
        c = self.config
        succeeded = sum(run["state"] in ("Cached", "Completed") for run in self.runs)
        hits = sum(run["state"] == "Cached" for run in self.runs)
        by_kind = collections.Counter(fault.kind for fault in self.faults)
        per_key = collections.Counter(m["key"] for m in self.computations)
        lines = [
            f"chaos soak: {len(self.hosts)} hosts x {c.processes} processes, {c.keys} keys, {c.expire:g} s expiry, "
            f"{self.wall:.0f} s of faults (seed {c.seed})",
            "faults injected: " + ", ".join(f"{by_kind[k]} {k}" for k in KINDS if by_kind[k]),
            f"runs: {len(self.runs)} reported ({succeeded} succeeded: {hits} hits, {succeeded - hits} misses; "
            f"{len(self.runs) - succeeded} failed); {self.killed_children} driver processes killed mid-run, {self.overran} overran the end",
            f"wrong values: {len(self.wrong)}",
            f"unreadable entries: {len(self.unreadable)} (of {self.checked_entries} entry files checked in {self.scans} scans; "
            f"{len(self.refused)} runs had an entry refused)",
            f"computations: {len(self.computations)} over {len(per_key)} keys; within one expiry of the previous one: "
            + ", ".join(f"{len(v)} {k}" for k, v in self.duplicates.items()) if self.duplicates else
            f"computations: {len(self.computations)} over {len(per_key)} keys; at most 1 per key per expiry",
            "errors by kind: " + (", ".join(f"{n} {k}" for k, n in self.errors.most_common()) or "none"),
            "warnings by kind: " + (", ".join(f"{n} {k}" for k, n in self.warnings.most_common()) or "none"),
            f"after the faults, every host read every key: {sum(r['value_ok'] is True for r in self.final_runs)} of "
            f"{len(self.final_runs)} right",
        ]
        return lines


ERROR_KINDS = (
    (r"transport endpoint is not connected|ENOTCONN", "dead mount (client killed)"),
    (r"gave up after .* waiting for the lock", "lock wait gave up"),
    (r"Input/output error|EIO|errno 5\b", "volume I/O error (metadata or object storage unreachable)"),
    (r"connect|Connection|timed out|Timeout|httpx|API", "Prefect API unreachable"),
)


def error_kind(text: str) -> str:
    for pattern, kind in ERROR_KINDS:
        if re.search(pattern, text):
            return kind
    return "other: " + text[:80]


def warning_kind(text: str) -> str:
    if "refused" in text:
        return "entry refused (unreadable)"
    if "cache storage failed" in text:
        return "not stored: cache storage failed"
    if "could not release" in text:
        return "lock release failed"
    return "other: " + text[:80]


class Soak:
    """3 hosts x 4 processes of cached-task calls over a few dozen keys, with random host and service faults."""

    def __init__(self, cluster: Cluster, path: Path, config: SoakConfig, log: Callable[[str], None] = print) -> None:
        self.cluster = cluster
        self.path = path
        self.config = config
        self.log = log
        self.random = random.Random(config.seed)
        self.keys = [f"chaos-{secrets.token_hex(3)}-{n}" for n in range(config.keys)]
        self.hosts = cluster.hosts
        self.markers = {name: path / f"markers-chaos-{name}.jsonl" for name in self.hosts}
        self.zygotes: dict[str, Zygote] = {}
        self.paused: set[str] = set()
        self.killed: set[int] = set()
        self.faults: list[Fault] = []
        self.unreadable: list[str] = []
        self.checked = 0
        self.scans = 0
        self._guard = threading.Lock()
        self._stop = threading.Event()
        self.deadline = 0.0
        self.started = 0.0
        self.signing_key = cluster.env.get("JUICECACHE_SIGNING_KEY", "")
        self.extra_env = {"JUICECACHE_LOCK_TIMEOUT": "90"}

    # The processes ------------------------------------------------------------------------

    def _spec(self, name: str, calls: int) -> dict:
        c = self.config
        return {
            "calls": [{"key": self.random.choice(self.keys)} for _ in range(max(1, calls))], "expire": c.expire,
            "work_seconds": c.work_seconds, "payload_bytes": c.payload_bytes, "markers": str(self.markers[name]), "pace": c.pace,
        }

    def _keep_running(self) -> None:
        """Keep `processes` drivers alive on every host that is not paused, until the deadline."""
        while not self._stop.is_set():
            remaining = self.deadline - time.time()
            if remaining < 3:
                break
            for name, zygote in self.zygotes.items():
                with self._guard:
                    if name in self.paused:
                        continue
                    missing = self.config.processes - len(zygote.live())
                    for _ in range(missing):
                        zygote.fork(self._spec(name, int(remaining / self.config.pace)))
            self._stop.wait(0.5)

    def _kill_children(self, name: str, count: int | None = None) -> int:
        live = self.zygotes[name].live()
        chosen = live if count is None else self.random.sample(live, min(count, len(live)))
        for pid in chosen:
            self.killed.add(pid)
            _signal(pid, signal.SIGKILL)
        return len(chosen)

    # The faults ---------------------------------------------------------------------------

    def _fault(self, kind: str) -> Fault:
        c = self.config
        name = self.random.choice(sorted(self.hosts))
        machine = self.hosts[name]
        if kind == "killed runs":
            fault = Fault(kind, None, time.time())
            killed = sum(self._kill_children(host, self.random.randint(0, 2)) for host in self.hosts)
            fault.detail = f"{killed} driver processes"
            fault.end = time.time()
        elif kind == "client killed":
            fault = Fault(kind, name, time.time())
            with self._guard:
                self.paused.add(name)
            kill_client(machine)
            time.sleep(self.random.uniform(0.5, 2.0))
            # Its runs fail on the dead mount; they and the zygote's next children must not touch
            # the bare folder under it while it is unmounted.
            killed = self._kill_children(name)
            remount(machine)
            with self._guard:
                self.paused.discard(name)
            fault.end = time.time()
            fault.detail = f"host {name}; {killed} of its driver processes stopped, remounted after {fault.end - fault.start:.0f} s"
        elif kind == "client frozen":
            held = self.random.uniform(3.0, c.session_expiry + 8.0)
            fault = Fault(kind, name, time.time(), detail=f"host {name}, {held:.0f} s")
            pids = freeze_client(machine)
            try:
                time.sleep(held)
            finally:
                thaw_client(pids)
            fault.end = time.time()
        elif kind in ("Redis restarted", "S3 stopped"):
            service, shortest, longest = ("redis", 1.0, 4.0) if kind == "Redis restarted" else ("s3", 3.0, 8.0)
            down = self.random.uniform(shortest, longest)
            fault = Fault(kind, None, time.time())
            try:
                self.cluster.stop_service(service)
                time.sleep(down)
            finally:
                up = self.cluster.stack("up")
            assert up.returncode == 0, up.stdout + up.stderr
            fault.end = time.time()
            fault.detail = f"down {fault.end - fault.start:.0f} s"
        elif kind == "host partitioned":
            held = self.random.uniform(3.0, c.session_expiry + 5.0)
            fault = Fault(kind, name, time.time(), detail=f"host {name}, {held:.0f} s")
            set_link(machine, False)
            try:
                time.sleep(held)
            finally:
                set_link(machine, True)
            fault.end = time.time()
        else:
            raise ValueError(kind)
        return fault

    def _scan(self) -> None:
        """Every entry file, read through a host whose client is live right now."""
        for name, machine in self.hosts.items():
            if name not in self.paused and client_pids(machine):
                problems, checked = entry_problems(machine.mount_point / RESULTS, self.signing_key)
                self.unreadable.extend(problems)
                self.checked += checked
                self.scans += 1
                return

    # The run ------------------------------------------------------------------------------

    def run(self) -> SoakResult:
        c = self.config
        for name, machine in self.hosts.items():
            self.zygotes[name] = Zygote(machine, self.extra_env)
        keeper = None
        try:
            # The first forks wait for each zygote's imports; the faults start once all hosts run.
            self.deadline = time.time() + c.seconds + 60
            for name, zygote in self.zygotes.items():
                for _ in range(c.processes):
                    zygote.fork(self._spec(name, int(c.seconds / c.pace) + 5))
            started = self.started = time.time()
            self.deadline = started + c.seconds
            keeper = threading.Thread(target=self._keep_running, daemon=True)
            keeper.start()
            # Every kind once in a random order, then at random: a short soak still sees them all.
            order = list(KINDS)
            self.random.shuffle(order)
            time.sleep(self.random.uniform(*c.quiet))
            while time.time() < self.deadline - 15 or order:
                self.deadline = max(self.deadline, time.time() + 20)  # the drivers outlast every fault
                kind = order.pop(0) if order else self.random.choice(KINDS)
                self.log(f"chaos: {kind} at {time.time() - started:.0f} s")
                fault = self._fault(kind)
                self.faults.append(fault)
                self.log(f"chaos:   recovered after {fault.end - fault.start:.1f} s ({fault.detail})")
                time.sleep(self.random.uniform(*c.quiet))
                self._scan()
            wall = time.time() - started
            self._stop.set()
            keeper.join(timeout=120)
            # The drivers finish their calls (paced to end near the deadline); any that overran is killed.
            everyone = [pid for zygote in self.zygotes.values() for pid in zygote.children]
            wait_until(lambda: not any(_alive(pid) for pid in everyone), 120, 0.5)
            overran = [pid for pid in everyone if _alive(pid)]
            for pid in overran:
                _signal(pid, signal.SIGKILL)
            wait_until(lambda: not any(_alive(pid) for pid in overran), 30, 0.1)
            self._scan()
            # Afterwards every host reads every key (hits, or recomputed after expiry): all right.
            final = {name: zygote.fork({**self._spec(name, 1), "calls": [{"key": key} for key in self.keys], "pace": None})
                     for name, zygote in self.zygotes.items()}
            wait_until(lambda: not any(_alive(pid) for pid in final.values()), 240, 0.5)
            final_runs = [run for name, zygote in self.zygotes.items() for run in zygote.runs() if run["pid"] == final[name]]
            runs = [run for zygote in self.zygotes.values() for run in zygote.runs() if run["pid"] not in final.values()]
        finally:
            self._stop.set()
            for machine in self.hosts.values():  # whatever happened: every host back
                set_link(machine, True)
                pids = client_pids(machine)
                thaw_client(pids)
            for zygote in self.zygotes.values():
                for pid in zygote.live():
                    _signal(pid, signal.SIGKILL)
                zygote.close()
        # Namespaces share a hostname: each host's markers go to a file of its own, which names it.
        tagged = ({**m, "client": name} for name, log in self.markers.items() for m in markers(log))
        computations = sorted(tagged, key=lambda m: (m["key"], m["start"]))
        final_pids = set(final.values())
        computations = [m for m in computations if m["pid"] not in final_pids]
        return SoakResult(
            config=c, hosts=sorted(self.hosts), faults=self.faults, runs=runs, computations=computations,
            killed_children=len(self.killed), overran=len(overran),
            wrong=[run for run in runs + final_runs if run["value_ok"] is False],
            unreadable=self.unreadable, checked_entries=self.checked, scans=self.scans,
            refused=[run for run in runs + final_runs if any("refused" in w for w in run["warnings"])],
            duplicates=classify_duplicates(computations, runs, self.faults, c, self.killed | set(overran)),
            errors=collections.Counter(error_kind(run["error"] or "") for run in runs if run["state"] not in ("Cached", "Completed")),
            warnings=collections.Counter(warning_kind(w) for run in runs for w in run["warnings"]),
            final_runs=final_runs, wall=wall, started=self.started,
        )


HOST_FAULTS = ("client killed", "client frozen", "host partitioned")


def classify_duplicates(
    computations: list[dict], runs: list[dict], faults: list[Fault], config: SoakConfig, killed: set[int]
) -> dict[str, list[tuple[dict, dict]]]:
    """Each computation of a key that started before its previous computation's entry expired, by why.

    Its entry's expiry counts from after the body ended (`end`), as in the load test.
    - "after a store that failed": the previous computation's run reported a failure, or a
      warning that its entry was not stored;
    - "after its writer was killed": the previous computation's process was killed before
      reporting (by the soak, or with its host's client);
    - "across a takeover": the previous computing host lost its JuiceFS session (client
      killed, frozen or cut off; or Redis down at least a session's expiry) between the two;
    - "across a storage outage": S3 or Redis was down between the two (the entry could not
      be stored, or the later run could not read it and computed instead, as documented);
    - "on a host that could not read the entry then": the later host was cut off or frozen;
    - "unexplained": none of these. The full soak fails on any (see `test_chaos_soak`).
    """
    runs_by_pid: dict[int, list[dict]] = collections.defaultdict(list)
    for run in runs:
        runs_by_pid[run["pid"]].append(run)
    found: dict[str, list[tuple[dict, dict]]] = collections.defaultdict(list)
    for before, after in zip(computations, computations[1:], strict=False):
        if before["key"] != after["key"] or after["start"] > before["end"] + config.expire:
            continue
        run = next((r for r in runs_by_pid.get(before["pid"], []) if r["key"] == before["key"] and r["start"] <= before["start"] <= r["end"]), None)
        between = [fault for fault in faults if fault.start <= after["end"] and fault.end >= before["start"] - 1]
        lost_session = any(
            (fault.kind in HOST_FAULTS and fault.host == before["client"])
            or (fault.kind == "Redis restarted" and fault.end - fault.start >= config.session_expiry)
            for fault in between
        )
        if run is not None and (run["state"] != "Completed" or run["warnings"]):
            found["after a store that failed"].append((before, after))
        elif run is None and (before["pid"] in killed or lost_session):
            found["after its writer was killed"].append((before, after))
        elif lost_session:
            found["across a takeover"].append((before, after))
        elif any(fault.kind in ("S3 stopped", "Redis restarted") for fault in between):
            # Storage warnings are reported once a minute per process, so the runs cannot say which:
            # the entry was not stored, or the later run could not read it and computed instead.
            found["across a storage outage (entry not stored, or not readable then)"].append((before, after))
        elif any(fault.kind in HOST_FAULTS and fault.host == after["client"] for fault in between):
            found["on a host that could not read the entry then (cut off or frozen)"].append((before, after))
        else:
            found["unexplained"].append((before, after))
    return dict(found)

