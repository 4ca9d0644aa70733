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

Which host lost its JuiceFS session, and when, is read from the clients' own logs
(`session_losses`): JuiceFS logs every stale session a client cleans up, locks included.
"""

from __future__ import annotations

import collections
import datetime
import json
import math
import os
import random
import re
import secrets
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from juicecache.entryfile import DATA, RECORDS, TEMP_PREFIX, EntryHeader, EntryRefused, Signer
from tests.support.cluster import Cluster, Machine
from tests.support.driver import DRIVER
from tests.support.environment import force_unmount, juicefs_client_pids
from tests.support.processes import wait_until

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


# -- JuiceFS sessions --------------------------------------------------------------------------


@dataclass(frozen=True)
class SessionLoss:
    """A host's JuiceFS session removed as stale while it was that host's session: every lock
    its processes held went with it (JuiceFS has no fencing: they do not know)."""

    host: str  # whose session it was
    sid: int
    at: float  # epoch seconds
    by: str  # the host whose client cleaned it up (a host may clean up its own, see docs/reliability.md)


_LOGGED = r"^(\d{4}/\d\d/\d\d \d\d:\d\d:\d\d\.\d+) juicefs\[\d+\] <\w+>: "
_CREATED = re.compile(_LOGGED + r"Create session (\d+) OK", re.M)
_CLEANED = re.compile(_LOGGED + r"clean up stale session (\d+) ", re.M)


def session_losses(logs: dict[str, str]) -> list[SessionLoss]:
    """Every session cleaned up while it was still its host's, from the JuiceFS logs by host name.

    A client logs `Create session N OK` when it mounts and `clean up stale session N ...` for
    each expired session it removes. Session N is host H's from H's `Create session N` until
    H mounts again; the cleanup of a session H had already replaced (a killed client, mounted
    again) takes nothing from H's runs, and is left out.
    """

    def when(text: str) -> float:  # JuiceFS logs this machine's local time
        return datetime.datetime.strptime(text, "%Y/%m/%d %H:%M:%S.%f").timestamp()

    created = sorted((when(at), int(sid), host) for host, log in logs.items() for at, sid in _CREATED.findall(log))
    owner = {sid: host for _, sid, host in created}
    losses = []
    for by, log in logs.items():
        for at, sid in _CLEANED.findall(log):
            host, moment = owner.get(int(sid)), when(at)
            current = [s for made, s, h in created if h == host and made <= moment]
            if host is not None and current and current[-1] == int(sid):
                losses.append(SessionLoss(host, int(sid), moment, by))
    return sorted(losses, key=lambda loss: loss.at)


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
    session_expiry: float  # 5 x the hosts' --heartbeat: the cluster's mount options decide it
    keys: int = 30
    processes: int = 4  # per host
    expire: float = 10.0
    work_seconds: float = 0.4
    pace: float = 1.0
    payload_bytes: int = 4096
    quiet: tuple[float, float] = (4.0, 8.0)  # seconds between one fault's recovery and the next fault
    seed: int = field(default_factory=lambda: secrets.randbits(32))


KINDS = ("killed runs", "client killed", "client frozen", "Redis restarted", "S3 stopped", "host partitioned")
# A key computed within the expiry of its previous computation: (the previous computation, this
# one, why: the fault and the evidence the checker found; empty when it found none).
Recomputation = tuple[dict, dict, str]


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
    duplicates: dict[str, list[Recomputation]]
    errors: collections.Counter
    warnings: collections.Counter
    final_runs: list[dict]
    wall: float
    started: float = 0.0
    session_losses: list[SessionLoss] = field(default_factory=list)

    def explain(self, recomputation: Recomputation) -> str:
        """One recomputation within an expiry, in full: both computations, their runs, why (if
        the checker found a reason), the faults and the JuiceFS sessions lost."""
        t = self.started
        before, after, why = recomputation
        lines = []
        for m in (before, after):
            run = [r for r in self.runs if r["pid"] == m["pid"] and r["key"] == m["key"] and r["start"] <= m["start"] <= r["end"]]
            shown = [(r["state"], r["value_ok"], r["warnings"], r["error"], round(r["start"] - t, 2), round(r["end"] - t, 2)) for r in run]
            lines.append(f"{m['key']} on {m['client']} pid {m['pid']}: {m['start'] - t:.2f}-{m['end'] - t:.2f} s; run {shown}")
        lines += [f"why: {why}"] if why else []
        lines += [f"fault {f.kind} {f.host or ''} {f.start - t:.1f}-{f.end - t:.1f} s {f.detail}" for f in self.faults]
        lines += [f"session {loss.sid} of host {loss.host} cleaned up by {loss.by} at {loss.at - t:.2f} s" for loss in self.session_losses]
        return "\n".join(lines)

    @property
    def unexplained(self) -> list[Recomputation]:
        return self.duplicates.get("unexplained", [])

    def write_events(self, path: Path) -> None:
        """The soak's event log, one JSON line each, times in seconds from the soak's start
        (`started`, in the first line): every fault, every JuiceFS session lost, every run
        each driver reported, every computation (marker), then each recomputation within an
        expiry with the checker's verdict and its reason. What a reader needs to check a
        verdict, or to find the cause of an unexplained one."""
        t = self.started

        def at(line: dict, *names: str) -> dict:
            return {**line, **{name: round(line[name] - t, 3) for name in names if line.get(name)}}

        lines = [{"event": "config", **vars(self.config), "started": t}]
        lines += [{"event": "fault", **at(vars(fault), "start", "end")} for fault in self.faults]
        lines += [{"event": "session lost", **at(vars(loss), "at")} for loss in self.session_losses]
        lines += [{"event": "run", **at(run, "start", "end")} for run in sorted(self.runs, key=lambda r: r["start"])]
        lines += [{"event": "computation", **at(m, "start", "end")} for m in self.computations]
        lines += [
            {"event": "recomputation", "verdict": verdict, "why": why, "before": at(before, "start", "end"),
             "after": at(after, "start", "end")}
            for verdict, found in self.duplicates.items() for before, after, why in found
        ]
        path.write_text("".join(json.dumps(line, default=str) + "\n" for line in lines))

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
    if "cache storage failed" in text and " reading " in text:
        return "not read: cache storage failed (computed instead)"
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
            # Afterwards every host reads every key (hits, or recomputed after expiry): all right. Each
            # host starts at another third of the keys, so the hosts recompute expired keys side by
            # side and then read each other's, instead of queueing on the same key's lock in turn.
            final = {
                name: zygote.fork({**self._spec(name, 1), "calls": [{"key": key} for key in _rotated(self.keys, n, len(self.zygotes))],
                                   "pace": None})
                for n, (name, zygote) in enumerate(self.zygotes.items())
            }
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
        # Which host's JuiceFS session was lost when, from every client's log (see `session_losses`).
        logs = {name: (machine.cache_dir / "juicefs-mount.log") for name, machine in self.hosts.items()}
        losses = session_losses({name: log.read_text(errors="replace") for name, log in logs.items() if log.exists()})
        return SoakResult(
            config=c, hosts=sorted(self.hosts), faults=self.faults, runs=runs, computations=computations,
            killed_children=len(self.killed), overran=len(overran),
            wrong=[run for run in runs + final_runs if run["value_ok"] is False],
            unreadable=self.unreadable, checked_entries=self.checked, scans=self.scans,
            refused=[run for run in runs + final_runs if any("refused" in w for w in run["warnings"])],
            duplicates=classify_duplicates(
                computations, runs, self.faults, c, self.killed | set(overran), losses, self.started
            ),
            errors=collections.Counter(error_kind(run["error"] or "") for run in runs if run["state"] not in ("Cached", "Completed")),
            warnings=collections.Counter(warning_kind(w) for run in runs for w in run["warnings"]),
            final_runs=final_runs, wall=wall, started=self.started, session_losses=losses,
        )


def _rotated(keys: list[str], part: int, parts: int) -> list[str]:
    """Every key, starting at the `part`-th of `parts` equal slices."""
    start = part * len(keys) // parts
    return keys[start:] + keys[:start]


HOST_FAULTS = ("client killed", "client frozen", "host partitioned")


def classify_duplicates(
    computations: list[dict], runs: list[dict], faults: list[Fault], config: SoakConfig, killed: set[int],
    losses: Sequence[SessionLoss] = (), started: float = 0.0,
) -> dict[str, list[Recomputation]]:
    """Each computation of a key that started before its previous computation's entry expired, by why.

    Its entry's expiry counts from after the body ended (`end`), as in the load test. `losses`:
    the JuiceFS sessions cleaned up (`session_losses`); `started`: times in the reasons count from it.
    - "after a store that failed": the previous computation's run failed, or its commit
      failed (Prefect's error, which the driver reports as `not_stored`), or it warned of
      anything but a failed read (a run that could not read an entry computed it; what
      became of its store is for the rules below);
    - "after its writer was killed": the previous computation's process was killed before
      reporting (by the soak, or with its host's client);
    - "across a takeover": the JuiceFS logs show the previous computing host's session
      cleaned up while that run held the key's lock, and the later run took the lock after
      that and before the earlier one let it go (both held it: the lock went with the
      session), during a fault that let the session expire (its client frozen, cut off or
      killed, or Redis down; see `_lock_lost`);
    - "across a takeover, after its host came back": the same, with the cleanup after that
      fault had ended (a client back from a long partition can lose its session once more,
      see docs/reliability.md);
    - "after a late writer replaced the entry": a third computation of the key, on a host that
      lost its session while it held the lock (JuiceFS log), ended its run after the previous
      computation, and its own entry, older, had expired when the later run looked: that late
      write replaced the previous computation's entry (no fencing, juicedata/juicefs#7462);
    - "across a storage outage": S3 or Redis was down between the two (the entry could not
      be stored, or the later run could not read it and computed instead, as documented);
    - "on a host that could not read the entry then": the later host was cut off or frozen;
    - "unexplained": none of these. The full soak fails on any (see `test_chaos_soak`).
    """
    runs_by_pid: dict[int, list[dict]] = collections.defaultdict(list)
    for run in runs:
        runs_by_pid[run["pid"]].append(run)
    by_key: dict[str, list[dict]] = collections.defaultdict(list)
    for m in computations:
        by_key[m["key"]].append(m)

    def run_of(m: dict) -> dict | None:
        return next((r for r in runs_by_pid.get(m["pid"], []) if r["key"] == m["key"] and r["start"] <= m["start"] <= r["end"]), None)

    def named(fault: Fault) -> str:
        return f"{fault.kind}{' ' + fault.host if fault.host else ''} {fault.start - started:.1f}-{fault.end - started:.1f} s"

    def lost(loss: SessionLoss, fault: Fault) -> str:
        return (f"host {loss.host}'s JuiceFS session {loss.sid} cleaned up (by {loss.by}) at {loss.at - started:.1f} s, "
                f"its session expired by {named(fault)}")

    found: dict[str, list[Recomputation]] = collections.defaultdict(list)
    for before, after in zip(computations, computations[1:], strict=False):
        if before["key"] != after["key"] or after["start"] > before["end"] + config.expire:
            continue
        run = run_of(before)
        # A warning about reading (the run could not read an entry, and computed) says nothing of its store.
        stored_nothing = [
            *(run or {}).get("not_stored", []),
            *(w for w in (run or {}).get("warnings", []) if warning_kind(w) != "not read: cache storage failed (computed instead)"),
        ]
        between = [fault for fault in faults if fault.start <= after["end"] and fault.end >= before["start"] - 1]
        lock_lost = _lock_lost(before, run, run_of(after), after, losses, faults, config)
        late = _late_writer(before, after, by_key[before["key"]], run_of, losses, faults, config)
        storage = next((fault for fault in between if fault.kind in ("S3 stopped", "Redis restarted")), None)
        unreadable = next((fault for fault in between if fault.kind in HOST_FAULTS and fault.host == after["client"]), None)
        if run is not None and (run["state"] != "Completed" or stored_nothing):
            verdict, why = "after a store that failed", f"its run {run['state']}: {(stored_nothing or [run['error']])[0]}"
        elif run is None and (before["pid"] in killed or lock_lost):
            verdict, why = "after its writer was killed", f"pid {before['pid']} was killed before it reported"
        elif lock_lost is not None:
            loss, fault = lock_lost
            verdict = "across a takeover, after its host came back" if loss.at > fault.end else "across a takeover"
            why = f"{lost(loss, fault)}; pid {before['pid']} held the key's lock then"
        elif late is not None:
            writer, writer_run, loss, fault = late
            verdict = "after a late writer replaced the entry"
            why = (f"pid {writer['pid']} on {writer['client']} computed at {writer['start'] - started:.1f}-{writer['end'] - started:.1f} s, "
                   f"lost its lock ({lost(loss, fault)}), and its run wrote its entry by {writer_run['end'] - started:.1f} s: "
                   f"expired at about {writer['end'] + config.expire - started:.1f} s")
        elif storage is not None:
            # Storage warnings are reported once a minute per process, so the runs cannot say which:
            # the entry was not stored, or the later run could not read it and computed instead.
            verdict, why = "across a storage outage (entry not stored, or not readable then)", named(storage)
        elif unreadable is not None:
            verdict, why = "on a host that could not read the entry then (cut off or frozen)", named(unreadable)
        else:
            verdict, why = "unexplained", ""
        found[verdict].append((before, after, why))
    return dict(found)


def _session_fault(loss: SessionLoss, faults: list[Fault], config: SoakConfig) -> Fault | None:
    """The injected fault that let a lost session expire: the last one that froze, cut off or
    killed its host's client (or took Redis down), begun before the cleanup and ended at most
    two session expiries before it. A session lost with no such fault has no explanation here."""
    return max(
        (
            fault for fault in faults
            if ((fault.kind in HOST_FAULTS and fault.host == loss.host) or fault.kind == "Redis restarted")
            and fault.start <= loss.at <= fault.end + 2 * config.session_expiry
        ),
        key=lambda fault: fault.start, default=None,
    )


def _held(m: dict, run: dict | None) -> tuple[float, float]:
    """When computation `m`'s run held its key's lock, as its driver reported it (`locked`,
    `released`); a run that did not report (killed), or an older event log, is bounded by the
    run's start and end, or by the computation itself."""
    if run is None:
        return m["start"] - 1, math.inf
    return run.get("locked") or run["start"], run.get("released") or run["end"]


def _lock_lost(
    m: dict, run: dict | None, other_run: dict | None, other: dict | None,
    losses: Sequence[SessionLoss], faults: list[Fault], config: SoakConfig,
) -> tuple[SessionLoss, Fault] | None:
    """The session loss that took computation `m`'s lock, and the fault that explains it: its
    host's session cleaned up after `m`'s run took the lock and before it let it go, after a
    fault on that host. With `other` (the computation that followed): it took the lock after
    that cleanup and before `m`'s run let go of it, so the two held the key at once."""
    locked, released = _held(m, run)
    if other is not None:
        taken = _held(other, other_run)[0]
        if taken >= released:  # `other` took the lock once `m` had let it go: no lock was lost between them
            return None
        released = min(released, taken)
    for loss in losses:
        if loss.host == m["client"] and locked <= loss.at <= released:
            fault = _session_fault(loss, faults, config)
            if fault is not None:
                return loss, fault
    return None


def _late_writer(
    before: dict, after: dict, same_key: list[dict], run_of: Callable[[dict], dict | None],
    losses: Sequence[SessionLoss], faults: list[Fault], config: SoakConfig,
) -> tuple[dict, dict, SessionLoss, Fault] | None:
    """A computation of the same key that could have replaced `before`'s entry with an older,
    already expired one by the time `after` looked: its host lost its session (so its lock)
    while it held the lock, its run stored its entry and ended after `before` computed, its own
    entry had expired before `after` started, and its host was back (the fault over) by then."""
    for m in same_key:
        if m is before or m is after:
            continue
        run = run_of(m)
        if run is None or run["state"] != "Completed" or run.get("not_stored"):  # it wrote no entry
            continue
        if run["end"] <= before["end"] or m["end"] + config.expire > after["start"]:
            continue
        lock_lost = _lock_lost(m, run, None, None, losses, faults, config)
        if lock_lost is not None and lock_lost[1].end <= after["start"]:
            return m, run, *lock_lost
    return None
