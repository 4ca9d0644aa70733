"""Keys and task identity: the same however the code is loaded, different for different tasks."""

from __future__ import annotations

from pathlib import Path

import pytest

from juicecache.cache import cached_task, namespaced_key, stable_hash, task_identity
from tests.support.modules import load

FLOWS = "def prepare(day):\n    return day\n"


@pytest.mark.parametrize("module_name", ["__main__", "flows", "__prefect_loader_0123456789abcdef__"])
def test_a_plain_file_is_named_by_its_file_however_it_is_loaded(tmp_path: Path, module_name: str) -> None:
    (tmp_path / "flows.py").write_text(FLOWS)
    assert task_identity(load(tmp_path / "flows.py", module_name).prepare) == "flows.prepare"


@pytest.mark.parametrize("module_name", ["__main__", "pkg.flows", "flows"])
def test_a_package_module_is_named_by_its_place_among_packages(tmp_path: Path, module_name: str) -> None:
    package = tmp_path / "checkout-one" / "pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "flows.py").write_text(FLOWS)
    assert task_identity(load(package / "flows.py", module_name).prepare) == "pkg.flows.prepare"


def test_the_checkout_path_does_not_matter(tmp_path: Path) -> None:
    keys = []
    for checkout in ("a/deep/checkout", "elsewhere"):
        (tmp_path / checkout).mkdir(parents=True)
        (tmp_path / checkout / "flows.py").write_text(FLOWS)
        fn = load(tmp_path / checkout / "flows.py", "__main__").prepare
        keys.append(namespaced_key(fn, lambda context, parameters: stable_hash(parameters))(None, {"day": "d"}))
    assert keys[0] == keys[1]


def test_namespace_and_version_set_the_identity() -> None:
    def prepare(day: str) -> str:
        return day

    assert task_identity(prepare, namespace="prices.load") == "prices.load"
    assert task_identity(prepare, version="2", namespace="prices.load") == "prices.load@2"
    assert task_identity(prepare, version="2").endswith(".prepare@2")


def test_code_not_from_a_file_keeps_its_module_name() -> None:
    scope: dict = {"__name__": "snippet"}
    exec(compile(FLOWS, "<stdin>", "exec"), scope)
    assert task_identity(scope["prepare"]) == "snippet.prepare"


def test_keys_are_safe_names_that_differ_by_task_and_input() -> None:
    def first(x: int) -> int:
        return x

    def second(x: int) -> int:
        return x

    by_input = namespaced_key(first, lambda context, parameters: stable_hash(parameters))
    other_task = namespaced_key(second, lambda context, parameters: stable_hash(parameters))
    one, two = by_input(None, {"x": 1}), by_input(None, {"x": 2})
    assert one != two != other_task(None, {"x": 1}) != one
    assert one.startswith("first-") and len(one.split("-")[-1]) == 40


def test_excluded_arguments_do_not_change_the_key() -> None:
    def load(day: str, client: object) -> str:
        return day

    key = namespaced_key(load, lambda context, parameters: stable_hash(parameters), frozenset({"client"}))
    assert key(None, {"day": "d", "client": 1}) == key(None, {"day": "d", "client": 2})


def test_options_prefect_would_take_off_the_volume_are_refused() -> None:
    with pytest.raises(TypeError, match="cached_task sets result_storage itself"):
        cached_task(result_storage="x")(lambda: 1)
    with pytest.raises(TypeError, match="has no argument 'nope'"):
        cached_task(exclude=["nope"])(lambda x: x)
