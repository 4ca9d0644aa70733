"""The public API in a user's own flow (`tests/support/user_flow.py`, not the demo), on a real volume.

Every run is a separate process, as on separate machines: what one computed, the next
must read from the mounted JuiceFS volume.
"""

from __future__ import annotations

import json

from juicecache.entryfile import read_header
from tests.support.environment import REPO, Sandbox
from tests.support.runs import ON_PATH, USER_FLOW, run_flow, volume_status


def states(outcomes: list[dict]) -> list[tuple[str, str, int]]:
    return [(o["task"], o["state"], o["result"]) for o in outcomes]


def records(box: Sandbox) -> list[str]:
    return sorted(path.name for path in (box.mount_point / "prefect-cache" / "records").iterdir())


def test_miss_then_hit_in_another_process(mounted: Sandbox) -> None:
    assert states(run_flow(mounted, ("square", [3], {}))) == [("square", "Completed", 9)]
    assert states(run_flow(mounted, ("square", [3], {}))) == [("square", "Cached", 9)]
    [entry] = records(mounted)
    assert entry.startswith("square-")
    assert read_header(mounted.mount_point / "prefect-cache" / "records" / entry).inline is not None  # payload inside
    assert not mounted.fallback_dir.exists()


def test_two_tasks_with_the_same_inputs_do_not_share_entries(mounted: Sandbox) -> None:
    first = run_flow(mounted, ("square", [3], {}), ("cube", [3], {}))
    assert states(first) == [("square", "Completed", 9), ("cube", "Completed", 27)]
    assert [name.split("-")[0] for name in records(mounted)] == ["cube", "square"]
    again = run_flow(mounted, ("cube", [3], {}), ("square", [3], {}))
    assert states(again) == [("cube", "Cached", 27), ("square", "Cached", 9)]


def test_kwargs_and_defaults_hash_like_positional_arguments(mounted: Sandbox) -> None:
    first = run_flow(
        mounted,
        ("square", [4], {}),
        ("square", [4, 0], {}),
        ("square", [], {"x": 4}),
        ("square", [], {"offset": 0, "x": 4}),
        ("square", [4], {"offset": 1}),
    )
    assert [o["state"] for o in first] == ["Completed", "Cached", "Cached", "Cached", "Completed"]
    assert [o["result"] for o in first] == [16, 16, 16, 16, 17]
    other_process = run_flow(mounted, ("square", [], {"x": 4, "offset": 0}), ("square", [], {"x": 4, "offset": 1}))
    assert states(other_process) == [("square", "Cached", 16), ("square", "Cached", 17)]
    assert len(records(mounted)) == 2


def test_unhashable_argument_is_one_clear_error(sandbox: Sandbox) -> None:
    done = sandbox.run(json.dumps([("guarded", [1, "<lock>"], {})]), script=USER_FLOW, extra_env=ON_PATH)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("juicecache.cache.UnhashableInput: cannot cache task 'guarded': its argument 'lock'"), last
    assert "exclude=['lock']" in last and "cache_key_fn=" in last
    # Prefect would otherwise log the key function's error and run the task uncached.
    assert "Error encountered when computing cache key" not in done.stderr


def test_excluded_argument_is_left_out_of_the_key(sandbox: Sandbox) -> None:
    """The fix the error suggests works; without a mount it is the local fallback, with one warning."""
    sandbox.mount_point.mkdir(parents=True)
    calls = [("guarded_excluding", [1, "<lock>"], {}), ("guarded_excluding", [1], {"lock": "<lock>"})]
    done = sandbox.run(json.dumps(calls), script=USER_FLOW, extra_env=ON_PATH)
    assert done.returncode == 0, done.stderr[-3000:]
    assert states(json.loads(done.stdout.splitlines()[-1])) == [
        ("guarded_excluding", "Completed", 1),
        ("guarded_excluding", "Cached", 1),
    ]
    warnings = [line for line in done.stderr.splitlines() if "is not mounted" in line]
    assert len(warnings) == 1 and str(sandbox.fallback_dir) in warnings[0]
    assert (sandbox.fallback_dir / "records").is_dir()


def test_volume_status_says_where_results_go(sandbox: Sandbox) -> None:
    unmounted = volume_status(sandbox)
    assert unmounted["mounted"] is False and unmounted["results"] == str(sandbox.fallback_dir)
    assert "is not mounted" in unmounted["warning"]
    assert unmounted["prefect_imported"] is False  # the status and settings are cheap to ask for
    assert unmounted["public"] == sorted(
        [
            "Settings", "Store", "UnhashableInput", "VolumeStatus", "cached_task", "get_settings", "shared",
            "shared_storage", "stable_hash", "volume_status",
        ]
    )

    assert sandbox.run("mount", timeout=90).returncode == 0
    mounted = volume_status(sandbox)
    assert mounted["mounted"] is True and mounted["warning"] is None
    assert mounted["results"] == str(sandbox.mount_point / "prefect-cache")
    assert mounted["volume"] == mounted["settings_volume"] == "testvol"
    assert mounted["mount_point"] == str(sandbox.mount_point)


def test_examples_reuse_their_entries(mounted: Sandbox) -> None:
    def finished(script: str, *args: str) -> list[str]:
        done = mounted.run(*args, script=REPO / "examples" / script, extra_env=ON_PATH)
        assert done.returncode == 0, done.stderr[-3000:]
        return [line for line in (done.stdout + done.stderr).splitlines() if "Finished in state" in line]

    first = [line for line in finished("prepare_once.py") if "prepare_dataset" in line]
    assert ["Cached" in line for line in first] == [False, True]  # computed by `train`, reused by `report`
    assert all("Cached" in line for line in finished("prepare_once.py") if "prepare_dataset" in line)

    assert sum("Cached" in line for line in finished("fan_out.py", "1", "2", "3")) == 0
    scores = [line for line in finished("fan_out.py", "1", "2", "3", "4") if "Task run 'score" in line]
    assert sorted("Cached" in line for line in scores) == [False, True, True, True]
