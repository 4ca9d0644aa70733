"""Keys that follow code changes (`cached_task(code=...)`): what changes a key and what does not."""

from __future__ import annotations

import importlib
import secrets
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

from tests.support.modules import load

TASKS = '''
from juicecache import cached_task
{imports}

def helper(x):
    return x + 1  # a helper in the user's own module


@cached_task(code="task")
def own(x):
    """Docstrings do not count."""
    return x * 2


@cached_task(code="calls")
def calling(x):
    return helper(x) {extra}


@cached_task(code=None)
def unversioned(x):
    return x * 2
'''


def keys(folder: Path, source: str | None = None, **fields: str) -> dict[str, str]:
    """Write the task file (`source`, or TASKS with `fields` filled in), load it as a script
    would, and compute each task's key."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tasks.py").write_text(source or TASKS.format(**{"imports": "", "extra": "", **fields}))
    module = load(folder / "tasks.py", "__main__")
    return {name: getattr(module, name).cache_policy.cache_key_fn(None, {"x": 1}) for name in ("own", "calling", "unversioned")}


PLAIN = TASKS.format(imports="", extra="")


def test_comments_blank_lines_and_docstrings_keep_the_keys(tmp_path: Path) -> None:
    layout = PLAIN.replace("return x * 2", "\n\n    # doubled\n    return x*2   # twice")
    layout = layout.replace('"""Docstrings do not count."""', '"""Another docstring."""')
    assert keys(tmp_path / "b", layout) == keys(tmp_path / "a")


def test_a_changed_body_changes_the_key_unless_code_is_none(tmp_path: Path) -> None:
    before = keys(tmp_path / "a")
    after = keys(tmp_path / "b", PLAIN.replace("return x * 2", "return x * 3"))
    assert after["own"] != before["own"]
    assert after["unversioned"] == before["unversioned"]


def test_a_changed_helper_changes_calls_keys_only(tmp_path: Path) -> None:
    before = keys(tmp_path / "a")
    after = keys(tmp_path / "b", PLAIN.replace("return x + 1", "return x + 2"))
    assert after["calling"] != before["calling"]
    assert after["own"] == before["own"]


def test_helpers_are_followed_into_other_user_modules_transitively(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(tmp_path))
    digests = []
    for body in ("return y - 1", "return y - 2"):
        name = f"userhelpers_{secrets.token_hex(4)}"
        (tmp_path / f"{name}.py").write_text(f"def inner(y):\n    {body}\n\ndef outer(y):\n    return inner(y)\n")
        digests.append(keys(tmp_path / name, imports=f"import {name}", extra=f"+ {name}.outer(x)")["calling"])
    assert digests[0] != digests[1]


def test_installed_packages_are_not_followed(tmp_path: Path) -> None:
    """A package in this interpreter's site-packages, changed between two loads: keys stay."""
    name = f"juicecache_test_installed_{secrets.token_hex(4)}"
    package = Path(sysconfig.get_paths()["purelib"]) / f"{name}.py"
    try:
        digests = []
        for body in ("return y - 1", "return y - 2"):
            package.write_text(f"def outer(y):\n    {body}\n")
            sys.modules.pop(name, None)
            importlib.invalidate_caches()
            digests.append(keys(tmp_path / body.replace(" ", ""), imports=f"import {name}", extra=f"+ {name}.outer(x)")["calling"])
        assert digests[0] == digests[1]
    finally:
        package.unlink(missing_ok=True)
        sys.modules.pop(name, None)


def test_the_same_code_at_two_checkout_paths_has_one_key(tmp_path: Path) -> None:
    assert keys(tmp_path / "checkout" / "one") == keys(tmp_path / "elsewhere")


def test_a_pickled_task_keeps_its_code_digest_without_its_source(tmp_path: Path) -> None:
    import cloudpickle

    before = keys(tmp_path / "a")
    module = load(tmp_path / "a" / "tasks.py", "__main__")
    pickled = cloudpickle.dumps(module.calling)
    (tmp_path / "a" / "tasks.py").unlink()  # a Dask worker has no source file
    assert cloudpickle.loads(pickled).cache_policy.cache_key_fn(None, {"x": 1}) == before["calling"]


def test_a_bad_code_mode_is_refused() -> None:
    from juicecache import cached_task

    with pytest.raises(TypeError, match="'body' is not one of 'task', 'calls' or None"):
        cached_task(code="body")(lambda x: x)


def test_textwrap_is_not_user_code() -> None:
    from juicecache.code_version import is_user_code

    assert not is_user_code(textwrap.dedent) and not is_user_code(pytest.raises)
    assert is_user_code(keys)


def test_code_without_source_has_the_same_key_in_every_process() -> None:
    """`python -c` code has no source file: its bytecode is hashed, never an address."""
    import subprocess

    snippet = (
        "from juicecache import cached_task\n"
        "@cached_task\n"
        "def f(x):\n"
        "    def inner(y): return y\n"
        "    return inner(x)\n"
        "print(f.cache_policy.cache_key_fn(None, {'x': 1}))\n"
    )
    runs = [subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, check=True) for _ in range(2)]
    assert runs[0].stdout == runs[1].stdout and runs[0].stdout.startswith("f-")
