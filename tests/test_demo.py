"""`python main.py -input ...` on a real JuiceFS volume, against a real Prefect server."""

from __future__ import annotations

import json
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

from juicecache.entryfile import read_header
from juicecache.volume import MountState, mount_info
from tests.support.environment import DEMO_SECONDS, MAIN, Sandbox, is_mounted
from tests.support.processes import free_port, wait_until


def run_json(box: Sandbox, *values: str, extra: tuple[str, ...] = ()) -> tuple[dict, float]:
    done, seconds = box.timed("-input", *values, "--json", *extra)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout), seconds


def test_miss_then_hit_on_the_volume(mounted: Sandbox) -> None:
    mounted.use_default_demo_seconds()  # the 3 s task a hit saves
    first, first_seconds = run_json(mounted, "1", "2.5", "abc")
    second, _ = run_json(mounted, "1", "2.5", "abc")

    assert first["cache"] == "miss" and first_seconds >= 3 and first["seconds"] >= 3
    # The run itself is what the cache saves: the hit skips the 3 s of work, so its run takes at
    # least 2 s less than the miss's, measured here (not an absolute bound a loaded machine would
    # break). The whole process adds Prefect's start-up and API calls, which a loaded machine
    # stretches by seconds either way; bench/ measures the end to end run.
    assert second["cache"] == "hit" and second["seconds"] < first["seconds"] - 2
    assert first["result"] == second["result"] == {"count": 3, "sum": 3.5, "text": "abc"}
    assert first["inputs"] == [1, 2.5, "abc"]
    assert first["key"] == second["key"]
    entry = mounted.mount_point / "prefect-cache" / "records" / first["key"]
    assert second["storage"] == str(entry) and entry.is_file()
    assert read_header(entry).inline is not None  # a small result travels inside its record
    assert mount_info(mounted.mount_point).state is MountState.LIVE and is_mounted(mounted.mount_point)
    assert not mounted.fallback_dir.exists()


def test_keys_follow_inputs_and_order(mounted: Sandbox) -> None:
    a, _ = run_json(mounted, "1", "2")
    b, _ = run_json(mounted, "2", "1")
    again, _ = run_json(mounted, "1", "2")
    assert a["key"] != b["key"]
    assert again["key"] == a["key"] and again["cache"] == "hit"


def test_human_output_says_what_happened(mounted: Sandbox) -> None:
    done = mounted.run("-input", "7", "x")
    assert done.returncode == 0, done.stderr
    for expected in ("cache miss", "result", "key", "JuiceFS volume 'testvol'", "time"):
        assert expected in done.stdout
    assert "hit" in mounted.run("-input", "7", "x").stdout


def test_refresh_recomputes_and_overwrites(mounted: Sandbox) -> None:
    """The first computation runs under another host name (a UTS namespace of its own), so the
    hit after `--refresh` can tell which computation it returns: the refreshed one."""
    renamed = ["unshare", "--uts", "sh", "-c", 'hostname before-refresh && exec "$0" "$@"', sys.executable, str(MAIN)]
    first = subprocess.run([*renamed, "-input", "5", "--json"], env=mounted.env, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    original = json.loads(first.stdout)
    assert original["cache"] == "miss" and original["computed_on"] == "before-refresh"
    files = [mounted.mount_point / "prefect-cache" / "records" / original["key"]]  # carrying its payload
    before = [(path.stat().st_ino, read_header(path).created, read_header(path).host) for path in files]
    assert all(host == "before-refresh" for _, _, host in before)

    refreshed, _ = run_json(mounted, "5", extra=("--refresh",))
    assert refreshed["cache"] == "miss" and refreshed["seconds"] >= DEMO_SECONDS
    assert refreshed["computed_on"] == socket.gethostname()
    after = [(path.stat().st_ino, read_header(path).created, read_header(path).host) for path in files]
    for (inode, created, _), (new_inode, new_created, host) in zip(before, after, strict=True):
        assert new_inode != inode and new_created > created and host == socket.gethostname()

    hit, _ = run_json(mounted, "5")
    assert hit["cache"] == "hit" and hit["computed_on"] == socket.gethostname()  # the refreshed computation
    assert hit["result"] == original["result"] == refreshed["result"]


def test_expire_makes_the_entry_a_miss_later(mounted: Sandbox) -> None:
    # Long enough that the hit below lands inside it even on a busy machine.
    first, _ = run_json(mounted, "9", extra=("--expire", "10s"))
    written = time.monotonic()
    assert run_json(mounted, "9")[0]["cache"] == "hit"
    time.sleep(max(0.0, written + 10.5 - time.monotonic()))
    assert run_json(mounted, "9")[0]["cache"] == "miss"


def test_fallback_without_a_mount(sandbox: Sandbox) -> None:
    sandbox.mount_point.mkdir(parents=True)  # exists, but nothing is mounted there
    done = sandbox.run("-input", "1", "--json")
    assert done.returncode == 0, done.stderr
    warnings = [line for line in done.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "not mounted" in warnings[0] and "./start_juice.sh" in warnings[0]
    report = json.loads(done.stdout)
    assert report["storage"].startswith(str(sandbox.fallback_dir)) and report["volume"] is None
    assert json.loads(sandbox.run("-input", "1", "--json").stdout)["cache"] == "hit"


def heartbeat_runs(api_url: str, since: str) -> set[str]:
    """Names of the flow runs that sent Prefect a heartbeat event since then."""
    query = {"filter": {"event": {"name": ["prefect.flow-run.heartbeat"]}, "occurred": {"since": since}}, "limit": 50}
    request = urllib.request.Request(
        f"{api_url}/events/filter", data=json.dumps(query).encode(), headers={"content-type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        return {event["resource"].get("prefect.resource.name") for event in json.load(answer)["events"]}


def test_demo_runs_send_heartbeats_only_when_asked(sandbox: Sandbox, prefect_api: str) -> None:
    """Heartbeats cost a demo run up to a second at its end (see `cli.demo_heartbeats`):
    off by default, on when PREFECT_FLOWS_HEARTBEAT_FREQUENCY is set."""
    since = datetime.now(UTC).isoformat()
    quiet, asked = ["quiet", secrets.token_hex(4)], ["asked", secrets.token_hex(4)]
    assert sandbox.run("-input", *quiet).returncode == 0
    assert sandbox.run("-input", *asked, extra_env={"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30"}).returncode == 0
    asked_name, quiet_name = f"inputs {asked!r}", f"inputs {quiet!r}"
    assert wait_until(lambda: asked_name in heartbeat_runs(prefect_api, since), 60), "the server never recorded the asked-for heartbeat"
    assert quiet_name not in heartbeat_runs(prefect_api, since)


def test_a_background_server_is_started_once_reused_and_stopped(sandbox: Sandbox) -> None:
    """Without PREFECT_API_URL, the first run starts a server on PREFECT_UI_HOST:PREFECT_UI_PORT
    in the background; the next run reports to it; `server stop` stops it."""
    port = free_port()
    env = {"PREFECT_API_URL": "", "PREFECT_UI_PORT": str(port), "JUICECACHE_BACKGROUND_SERVER": "1", "JUICECACHE_ROOT": str(sandbox.path)}
    try:
        first = sandbox.run("-input", "7", extra_env=env, timeout=240)
        assert first.returncode == 0, first.stderr
        assert f"server at http://127.0.0.1:{port}/api" in first.stdout and "started in the background" in first.stdout
        pid = int((sandbox.path / ".juicecache" / "prefect-server.pid").read_text())
        second = sandbox.run("-input", "7", extra_env=env)
        assert second.returncode == 0 and "cache hit" in second.stdout
        assert f"server at http://127.0.0.1:{port}/api" in second.stdout and "started" not in second.stdout
        assert sandbox.run("server", "status", extra_env=env).returncode == 0
    finally:
        stopped = sandbox.run("server", "stop", extra_env=env)
    assert stopped.returncode == 0 and "stopped" in stopped.stdout, stopped.stderr
    assert sandbox.run("server", "status", extra_env=env).returncode == 1
    assert wait_until(lambda: not Path(f"/proc/{pid}").exists(), timeout=30)


def test_a_port_taken_by_something_else_falls_back_to_a_temporary_server(sandbox: Sandbox) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        env = {"PREFECT_API_URL": "", "PREFECT_UI_PORT": str(port), "JUICECACHE_BACKGROUND_SERVER": "1", "JUICECACHE_ROOT": str(sandbox.path)}
        done = sandbox.run("-input", "8", extra_env=env, timeout=240)
    assert done.returncode == 0, done.stderr
    [warning] = [line for line in done.stderr.splitlines() if "temporary Prefect server" in line]
    assert f"port {port}" in warning and "taken" in warning
    assert not (sandbox.path / ".juicecache" / "prefect-server.pid").exists()
