"""cached_task's own options (expire=, refresh=, version=, and every option it refuses) and
async cached tasks, through a user's flow on real storage (tests/support/options_flow.py)."""

from __future__ import annotations

import json
from collections import Counter
from datetime import timedelta

import pytest
from prefect.cache_policies import INPUTS

from tests.support.environment import REPO, Sandbox

OPTIONS_FLOW = REPO / "tests" / "support" / "options_flow.py"


def run_steps(box: Sandbox, *steps: tuple[str, float]) -> list[tuple[str, str, int]]:
    done = box.run(str(box.path / "markers.jsonl"), json.dumps(steps), script=OPTIONS_FLOW, extra_env={"PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-3000:]
    return [(o["task"], o["state"], o["result"]) for o in json.loads(done.stdout.splitlines()[-1])]


def computed(box: Sandbox) -> Counter:
    path = box.path / "markers.jsonl"
    return Counter(tuple(json.loads(line)) for line in path.read_text().splitlines()) if path.exists() else Counter()


def test_expire_and_refresh_options(mounted: Sandbox) -> None:
    """expire="2s": a hit within 2 s, a miss after; refresh=True: computed and stored every time."""
    outcomes = run_steps(
        mounted, ("expiring", 1), ("expiring", 1), ("sleep", 2.5), ("expiring", 1), ("refreshing", 1), ("refreshing", 1),
    )
    assert outcomes == [
        ("expiring", "Completed", 2), ("expiring", "Cached", 2), ("expiring", "Completed", 2),
        ("refreshing", "Completed", 3), ("refreshing", "Completed", 3),
    ]
    assert computed(mounted) == Counter({("expiring", 1): 2, ("refreshing", 1): 2})
    entries = json.loads(mounted.run("cache", "ls", "--json").stdout)["entries"]
    assert sorted((e["task"], e["expires"] is not None) for e in entries) == [("expiring", True), ("refreshing", False)]


def test_async_cached_task_computes_once_and_is_a_hit_later(mounted: Sandbox) -> None:
    """Two concurrent calls of an async cached task with a new key (the async lock and storage
    paths) compute it once; another process then reads it as a hit."""
    first = run_steps(mounted, ("async_pair", 7))
    assert sorted(first) == [("slow_async", "Cached", 70), ("slow_async", "Completed", 70)]
    second = run_steps(mounted, ("async", 7))
    assert second == [("slow_async", "Cached", 70)]
    assert computed(mounted) == Counter({("slow_async", 7): 1})


def test_version_changes_the_key() -> None:
    from juicecache.cache import cached_task

    def keyed(**options) -> str:
        def double(x: int) -> int:
            return 2 * x

        task = cached_task(**options)(double)
        return task.cache_policy.compute_key(task_ctx=None, inputs={"x": 3}, flow_parameters={})

    assert keyed(version="1") == keyed(version="1")
    assert len({keyed(), keyed(version="1"), keyed(version="2")}) == 3


def _plain(x: int) -> int:
    return x


def _generator(x: int):
    yield x


async def _async_generator(x: int):
    yield x


@pytest.mark.parametrize(
    "options, fn, fragment",
    [
        ({"cache_policy": INPUTS.configure(key_storage="/elsewhere")}, _plain, "juicecache sets key_storage itself"),
        ({"cache_policy": INPUTS.configure(isolation_level="READ_COMMITTED")}, _plain, "juicecache sets isolation_level itself"),
        ({"cache_policy": "inputs"}, _plain, "is not a Prefect cache policy"),
        ({"cache_policy": INPUTS, "cache_key_fn": lambda context, arguments: "k"}, _plain, "cache_key_fn or cache_policy, not both"),
        ({"code": "body"}, _plain, "'body' is not one of 'task', 'calls' or None"),
        ({"result_storage": None}, _plain, "cached_task sets result_storage itself"),
        ({"result_storage_key": "k"}, _plain, "cached_task sets result_storage_key itself"),
        ({"persist_result": False}, _plain, "cached_task sets persist_result itself"),
        ({}, _generator, "is a generator function"),
        ({}, _async_generator, "is a generator function"),
        ({"exclude": ["y"]}, _plain, "has no argument 'y'"),
        ({"expire": "1s", "cache_expiration": None}, _plain, None),  # Prefect's None is "not given"
        ({"expire": "1s", "cache_expiration": timedelta(seconds=1)}, _plain, "pass expire or cache_expiration, not both"),
        ({"refresh": True, "refresh_cache": True}, _plain, "pass refresh or refresh_cache, not both"),
        ({"expire": "soon"}, _plain, "soon"),
    ],
)
def test_each_refused_option_says_why(options: dict, fn, fragment: str | None) -> None:
    from juicecache.cache import cached_task

    if fragment is None:
        cached_task(**options)(fn)
        return
    with pytest.raises((TypeError, ValueError)) as refused:
        cached_task(**options)(fn)
    assert fragment in str(refused.value)


