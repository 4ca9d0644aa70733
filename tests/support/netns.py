"""A tiny private network of "hosts" (Linux network namespaces) for tests and benchmarks.

    with network(["a", "b"]) as hosts:
        hosts["b"].popen(["python", "-m", "http.server", "--bind", hosts["b"].ip, "8000"])
        hosts["a"].run(["curl", f"http://{hosts['b'].ip}:8000/"])

Layout: one Linux bridge in the root namespace holding x.x.x.1 (so the root reaches every
host and can serve them), and per host one netns whose `eth0` is a veth plugged into that
bridge. Hosts share the root's filesystem and mount namespace: commands run through
`nsenter --net` and not `ip netns exec`, because the latter gives every call a private mount
namespace and a FUSE mount made through it would be invisible to everyone else.

Every name carries a session token (6 hex digits of our pid + 2 random), so parallel runs
never collide and `cleanup_leftovers` can tell a crashed run's debris (owner pid gone) from
a live run's. Needs root.
"""

from __future__ import annotations

import fcntl
import functools
import ipaddress
import json
import os
import random
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

PREFIX = "jc"
NETNS_DIR = "/var/run/netns"
HOST_IFNAME = "eth0"
_BRIDGE_NF = "/proc/sys/net/bridge/bridge-nf-call-iptables"


class NetemUnavailable(RuntimeError):
    """Latency was asked for, but this machine cannot emulate it (no `tc` or no sch_netem)."""


@dataclass(frozen=True)
class Host:
    name: str  # the netns name, unique per session
    ip: str  # this host's address on the private bridge network
    root_ip: str = ""  # the root namespace's address on the same network
    ifname: str = HOST_IFNAME

    def netns_path(self) -> str:
        return os.path.join(NETNS_DIR, self.name)

    def argv(self, argv: Sequence[str]) -> list[str]:
        """`argv` wrapped to run in this host's network namespace (and the shared mount namespace)."""
        if isinstance(argv, (str, bytes)):
            raise TypeError("argv must be a sequence of strings, not a string")
        return ["nsenter", f"--net={self.netns_path()}", "--", *map(os.fspath, argv)]

    def run(self, argv: Sequence[str], **popen_kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(argv), **popen_kwargs)

    def popen(self, argv: Sequence[str], **popen_kwargs) -> subprocess.Popen:
        # nsenter execs the command (no fork without --pid), so .pid is the command itself.
        proc = subprocess.Popen(self.argv(argv), **popen_kwargs)
        self._wait_entered(proc)
        return proc

    def _wait_entered(self, proc: subprocess.Popen, timeout: float = 5.0) -> None:
        """Popen returns once nsenter is exec'd, maybe before its setns(). Wait until the process
        is in the namespace, so a teardown right after popen() finds and kills it."""
        ns = os.stat(self.netns_path())
        deadline = time.monotonic() + timeout
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                st = os.stat(f"/proc/{proc.pid}/ns/net")
            except OSError:
                return
            if (st.st_dev, st.st_ino) == (ns.st_dev, ns.st_ino):
                return
            time.sleep(0.001)


def _run(argv: Sequence[str], check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(argv), capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return _run(["ip", *args], check=check)


def process_token() -> str:
    """The part of every name this process makes that says it made it (its pid)."""
    return f"{os.getpid() & 0xFFFFFF:06x}"


def _new_token() -> str:
    return f"{process_token()}{secrets.token_hex(1)}"


@functools.cache
def unavailable_reason() -> str | None:
    """Why `network()` cannot work here (for pytest skips), or None if it can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "nsenter"):
        if shutil.which(tool) is None:
            return f"`{tool}` not found"
    probe = f"{PREFIX}-{_new_token()}-probe"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


@functools.cache
def netem_unavailable_reason() -> str | None:
    """Why `latency=` cannot work here, or None. Probes netem on `lo` of a throwaway netns."""
    if shutil.which("tc") is None:
        return "`tc` (iproute2) not found: cannot emulate latency"
    if (reason := unavailable_reason()) is not None:
        return reason
    probe = f"{PREFIX}-{_new_token()}-probe"
    _ip("netns", "add", probe)
    try:
        out = _run(["tc", "-n", probe, "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"], check=False)
    finally:
        _ip("netns", "del", probe, check=False)
    if out.returncode != 0:
        return f"sch_netem unavailable in this kernel (CONFIG_NET_SCH_NETEM): tc says {out.stderr.strip()!r}"
    return None


@contextmanager
def _subnet_lock() -> Iterator[None]:
    """Serialise "pick a free /24 and claim it" between concurrent runs on this machine."""
    lock_dir = "/run/lock" if os.path.isdir("/run/lock") else tempfile.gettempdir()
    with open(os.path.join(lock_dir, "juicecache-netns.lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _used_networks() -> list[ipaddress.IPv4Network]:
    used = []
    for entry in json.loads(_ip("-j", "-4", "addr").stdout or "[]"):
        for a in entry.get("addr_info", []):
            used.append(ipaddress.ip_network(f"{a['local']}/{a['prefixlen']}", strict=False))
    for r in json.loads(_ip("-j", "-4", "route", "show", "table", "all").stdout or "[]"):
        dst = r.get("dst", "")
        if dst and dst != "default":
            used.append(ipaddress.ip_network(dst if "/" in dst else f"{dst}/32", strict=False))
    return used


def _pick_subnet() -> ipaddress.IPv4Network:
    used = _used_networks()
    for x in random.sample(range(256), 256):
        candidate = ipaddress.ip_network(f"10.231.{x}.0/24")
        if not any(candidate.overlaps(u) for u in used):
            return candidate
    raise RuntimeError("no free 10.231.X.0/24 subnet on this machine")


def _bridge_nf_on() -> bool:
    try:
        with open(_BRIDGE_NF) as f:
            return f.read().strip() == "1"
    except OSError:  # br_netfilter not loaded: bridged frames never see iptables
        return False


def _allow_bridged(bridge: str) -> list[str] | None:
    """With bridge-nf-call-iptables=1, bridged host<->host frames traverse the root's iptables
    FORWARD chain, and a DROP policy there (Docker sets one) silently cuts the hosts apart.
    Insert an ACCEPT for this bridge only (removed at teardown) instead of flipping the global
    sysctl. Returns the rule to delete later, or None if nothing was needed or possible."""
    if not _bridge_nf_on() or shutil.which("iptables") is None:
        return None
    # An untouched chain needs nothing, and inserting would leave a (then empty) filter table behind.
    if _run(["iptables", "-w", "-S", "FORWARD"], check=False).stdout.split() == ["-P", "FORWARD", "ACCEPT"]:
        return None
    rule = ["FORWARD", "-i", bridge, "-o", bridge, "-j", "ACCEPT"]
    out = _run(["iptables", "-w", "-I", *rule], check=False)
    if out.returncode != 0:
        warnings.warn(f"could not allow bridged traffic on {bridge}: {out.stderr.strip()}", stacklevel=3)
        return None
    return rule


def _ns_pids(ns: str) -> list[int]:
    # Zombies are not listed (their /proc/PID/ns/net is gone), so this empties once all have exited.
    out = _ip("netns", "pids", ns, check=False)
    return [int(p) for p in out.stdout.split()] if out.returncode == 0 else []


def _kill_ns_processes(ns: str, grace: float = 3.0) -> None:
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 2.0)):
        pids = _ns_pids(ns)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while _ns_pids(ns) and time.monotonic() < deadline:
            time.sleep(0.05)


def _link_names() -> list[str]:
    return [link["ifname"] for link in json.loads(_ip("-j", "link", "show").stdout or "[]")]


def _teardown(namespaces: list[str], links: list[str], rule: list[str] | None, strict: bool) -> None:
    """Best effort through every step; raises at the end only if asked (body did not raise)."""
    errors: list[str] = []
    for ns in namespaces:
        _kill_ns_processes(ns)
    present = set(_link_names())
    # Veths first, then the bridge. Deleting the root-side veth removes its peer at once,
    # while `ip netns del` would free it asynchronously.
    for link in reversed(links):
        if link in present:
            out = _ip("link", "del", link, check=False)
            if out.returncode != 0:
                errors.append(out.stderr.strip())
    for ns in namespaces:
        out = _ip("netns", "del", ns, check=False)
        if out.returncode != 0 and os.path.exists(os.path.join(NETNS_DIR, ns)):
            errors.append(out.stderr.strip())
    if rule is not None:
        out = _run(["iptables", "-w", "-D", *rule], check=False)
        if out.returncode != 0:
            errors.append(out.stderr.strip())
    if errors and strict:
        raise RuntimeError("network teardown incomplete: " + "; ".join(errors))


@contextmanager
def network(
    host_names: list[str],
    subnet: str | None = None,
    latency: dict[str, str] | None = None,
    prefix: str = PREFIX,
) -> Iterator[dict[str, Host]]:
    """Create the hosts, yield {host_name: Host}, and remove everything on exit (even on error).

    `subnet`: an IPv4 network to use (default: a free random 10.231.X.0/24); the root gets
    its first address, hosts the following ones in order. `latency`: {host_name: "10ms"}
    adds a netem delay on egress of that host's eth0 (so every round trip to it gets slower);
    raises NetemUnavailable if the kernel cannot do it.
    """
    if not host_names or len(set(host_names)) != len(host_names):
        raise ValueError("host_names must be non-empty and unique")
    bad = [h for h in host_names if not re.fullmatch(r"[A-Za-z0-9_.-]+", h)]
    if bad:
        raise ValueError(f"host names may only use letters, digits, '_', '.', '-': {bad}")
    if not re.fullmatch(r"[a-z0-9]{1,4}", prefix):
        raise ValueError("prefix must be 1-4 lowercase letters/digits (interface names are <= 15 chars)")
    latency = dict(latency or {})
    if unknown := set(latency) - set(host_names):
        raise ValueError(f"latency for unknown hosts: {sorted(unknown)}")
    if latency and (reason := netem_unavailable_reason()) is not None:
        raise NetemUnavailable(reason)

    token = _new_token()
    bridge = f"{prefix}b{token}"
    namespaces: list[str] = []
    links: list[str] = []
    rule: list[str] | None = None
    ok = False
    try:
        with _subnet_lock():
            net = ipaddress.ip_network(subnet) if subnet else _pick_subnet()
            addrs = list(net.hosts())
            if len(addrs) < len(host_names) + 1:
                raise ValueError(f"subnet {net} too small for {len(host_names)} hosts")
            _ip("link", "add", bridge, "type", "bridge")
            links.append(bridge)
            _ip("addr", "add", f"{addrs[0]}/{net.prefixlen}", "dev", bridge)
        _ip("link", "set", bridge, "up")
        rule = _allow_bridged(bridge)

        hosts: dict[str, Host] = {}
        for i, hname in enumerate(host_names):
            ns = f"{prefix}-{token}-{hname}"
            veth = f"{prefix}v{token}{i:x}"
            _ip("netns", "add", ns)
            namespaces.append(ns)
            _ip("link", "add", veth, "type", "veth", "peer", "name", HOST_IFNAME, "netns", ns)
            links.append(veth)
            _ip("link", "set", veth, "master", bridge, "up")
            _ip("-n", ns, "addr", "add", f"{addrs[i + 1]}/{net.prefixlen}", "dev", HOST_IFNAME)
            _ip("-n", ns, "link", "set", HOST_IFNAME, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            hosts[hname] = Host(name=ns, ip=str(addrs[i + 1]), root_ip=str(addrs[0]))

        for hname, delay in latency.items():
            _run(["tc", "-n", hosts[hname].name, "qdisc", "add", "dev", HOST_IFNAME, "root", "netem", "delay", delay])

        yield hosts
        ok = True
    finally:
        _teardown(namespaces, links, rule, strict=ok)


def cleanup_leftovers(prefix: str = PREFIX, force: bool = False) -> list[str]:
    """Remove namespaces, veths, bridges (and their iptables rule) left by crashed runs.

    Only names whose owner pid (encoded in the token) is gone are touched, so a live
    parallel run is safe; `force=True` removes everything with our prefix. Returns what went.
    """
    pattern = re.compile(rf"{re.escape(prefix)}[-bv]([0-9a-f]{{6}})[0-9a-f]{{2}}")

    def stale(name: str) -> bool:
        m = pattern.match(name)
        if not m:
            return False
        if force:
            return True
        pid = int(m[1], 16)
        return pid != (os.getpid() & 0xFFFFFF) and not os.path.exists(f"/proc/{pid}")

    namespaces = sorted(n for n in os.listdir(NETNS_DIR) if stale(n)) if os.path.isdir(NETNS_DIR) else []
    links = [n for n in _link_names() if stale(n)]
    links.sort(key=lambda n: n[len(prefix)] == "b")  # veths before bridges
    for ns in namespaces:
        _kill_ns_processes(ns)
    for link in links:
        _ip("link", "del", link, check=False)
    for ns in namespaces:
        _ip("netns", "del", ns, check=False)
    if shutil.which("iptables"):
        for line in _run(["iptables", "-w", "-S", "FORWARD"], check=False).stdout.splitlines():
            parts = line.split()
            if parts[:2] == ["-A", "FORWARD"] and "-i" in parts and stale(parts[parts.index("-i") + 1]):
                _run(["iptables", "-w", "-D", *parts[1:]], check=False)
    return namespaces + links
