"""Prefect's own cache policies on the shared volume, and read-only consumers, on a real
volume with a real Prefect server. (Keys that follow code: tests/unit/test_code_keys.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.support.environment import REPO, Sandbox
from tests.support.start_gate import StartGate

POLICY_FLOWS = REPO / "tests" / "support" / "policy_flows.py"
WORK_SECONDS = 4.0  # policy_flows.WORK_SECONDS by default: how long each computation lasts
ON_PATH = {"PYTHONPATH": str(REPO)}
# JuiceFS's own files at the mount's root, which it changes by itself.
JUICEFS_FILES = {".accesslog", ".config", ".stats", ".trash", ".control"}


# Runs one at a time: no other run overlaps a computation, so a short one does (the barrier test keeps 4 s).
SHORT_WORK = {"POLICY_WORK_SECONDS": "0.5"}


def run(box: Sandbox, *args: str, extra_env: dict[str, str] | None = None) -> dict:
    done = box.run(*args, script=POLICY_FLOWS, extra_env={**ON_PATH, **SHORT_WORK, **(extra_env or {})})
    assert done.returncode == 0, done.stderr[-3000:]
    return {**json.loads(done.stdout.splitlines()[-1]), "stderr": done.stderr}


def computations(markers: Path) -> int:
    return len(list(markers.iterdir())) if markers.exists() else 0


def test_a_policy_with_task_source_misses_then_hits_in_another_process(mounted: Sandbox, tmp_path: Path) -> None:
    markers = str(tmp_path / "markers")
    assert run(mounted, "policy", markers, "1")["state"] == "Completed"
    again = run(mounted, "policy", markers, "1")
    assert (again["state"], again["result"]) == ("Cached", 101)
    assert computations(tmp_path / "markers") == 1


def test_a_policy_minus_an_argument_ignores_it(mounted: Sandbox, tmp_path: Path) -> None:
    markers = str(tmp_path / "markers")
    assert run(mounted, "debug", markers, "2", "0")["state"] == "Completed"
    with_debug = run(mounted, "debug", markers, "2", "1")
    assert (with_debug["state"], with_debug["result"]) == ("Cached", 202)
    assert run(mounted, "debug", markers, "3", "1")["state"] == "Completed"
    assert computations(tmp_path / "markers") == 2


def test_a_plain_task_with_the_shared_policy_computes_once_across_processes(mounted: Sandbox, tmp_path: Path) -> None:
    """Four processes ask for one new key at the same moment (a start barrier): one computes."""
    markers = tmp_path / "markers"
    gate = StartGate(tmp_path / "gate", 4)  # opened once every process has imported Prefect and created its flow run
    runs = [
        subprocess.Popen(
            [sys.executable, str(POLICY_FLOWS), "plain", str(markers), "4", "0", str(gate)], env={**mounted.env, **ON_PATH},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
        )
        for _ in range(4)
    ]
    ready = gate.open_when_ready(runs)
    outputs = [process.communicate(timeout=240) for process in runs]
    assert all(process.returncode == 0 for process in runs), [err[-2000:] for _, err in outputs]
    assert ready == 4, ready
    reports = [json.loads(out.splitlines()[-1]) for out, _ in outputs]
    assert sorted(report["state"] for report in reports) == ["Cached", "Cached", "Cached", "Completed"]
    assert {report["result"] for report in reports} == {304}
    assert computations(markers) == 1
    # They overlapped: every process began before the one computation could have ended.
    [marker] = markers.iterdir()
    assert max(report["began"] for report in reports) < marker.stat().st_mtime + WORK_SECONDS


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under `root` with its size and mtime (JuiceFS's own files aside)."""
    found = {}
    for folder, folders, files in os.walk(root):
        if Path(folder) == root:
            folders[:] = [name for name in folders if name not in JUICEFS_FILES]
            files = [name for name in files if name not in JUICEFS_FILES]
        for name in [*folders, *files]:
            status = os.lstat(Path(folder) / name)
            found[str(Path(folder, name).relative_to(root))] = (status.st_size, status.st_mtime_ns)
    return found


def test_a_read_only_consumer_serves_hits_and_writes_nothing(mounted: Sandbox, tmp_path: Path) -> None:
    markers = str(tmp_path / "markers")
    assert run(mounted, "policy", markers, "5")["state"] == "Completed"
    before = snapshot(mounted.mount_point)
    read_only = {"JUICECACHE_READ_ONLY": "1"}
    hit = run(mounted, "policy", markers, "5", extra_env=read_only)
    assert (hit["state"], hit["result"]) == ("Cached", 105)
    miss = run(mounted, "policy", markers, "6", extra_env=read_only)
    assert (miss["state"], miss["result"]) == ("Completed", 106)
    assert miss["stderr"].count("computed, not stored") == 1
    assert snapshot(mounted.mount_point) == before
    # Not stored: the same miss computes again.
    assert run(mounted, "policy", markers, "6", extra_env=read_only)["state"] == "Completed"
    assert snapshot(mounted.mount_point) == before


def test_a_read_only_mount_is_detected(mounted: Sandbox, tmp_path: Path) -> None:
    markers = str(tmp_path / "markers")
    assert run(mounted, "policy", markers, "7")["state"] == "Completed"
    assert mounted.run("unmount").returncode == 0
    remounted = mounted.run("mount", extra_env={"JFS_MOUNT_OPTIONS": "--read-only"}, timeout=90)
    assert remounted.returncode == 0, remounted.stderr
    before = snapshot(mounted.mount_point)
    assert run(mounted, "policy", markers, "7")["state"] == "Cached"
    miss = run(mounted, "policy", markers, "8")
    assert (miss["state"], miss["result"]) == ("Completed", 108)
    assert "computed, not stored" in miss["stderr"]
    assert snapshot(mounted.mount_point) == before


def test_status_shows_the_read_only_mode(mounted: Sandbox) -> None:
    shown = mounted.run("status", "--json", extra_env={"JUICECACHE_READ_ONLY": "1"})
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["results"]["read_only"] is True
    assert "read-only" in mounted.run("status", extra_env={"JUICECACHE_READ_ONLY": "1"}).stdout
    assert json.loads(mounted.run("status", "--json").stdout)["results"]["read_only"] is False
