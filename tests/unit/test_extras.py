"""The demo and the development stack live apart from the library: an installed juicecache
without the `devstack` extra says in one line what to install, and the library never
imports either part."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from juicecache.cli import main
from juicecache.cli.common import prog
from juicecache.extras import MissingExtra, require

INSTALL = "pip install 'juicecache[devstack]'"


@pytest.fixture
def without_redis(monkeypatch: pytest.MonkeyPatch) -> None:
    """An interpreter where the Redis client is not installed, and the development stack not
    imported yet.

    A fake, because the test venv has redis (requirements.txt installs it for the stack, the
    tests and the benchmark) and uninstalling it would break every other test. `None` in
    `sys.modules` is Python's own "not importable" marker: `import redis` then raises the
    `ModuleNotFoundError` (name "redis") that a missing package raises. The stack's modules
    are dropped so that importing them runs their import-time check again; monkeypatch puts
    all of it back afterwards.
    """
    monkeypatch.setitem(sys.modules, "redis", None)
    for name in [name for name in sys.modules if name == "juicecache.devstack" or name.startswith("juicecache.devstack.")]:
        monkeypatch.delitem(sys.modules, name)


@pytest.mark.usefixtures("without_redis")
@pytest.mark.parametrize("action", ["up", "down", "status"])
def test_stack_without_its_extra_fails_in_one_line_naming_it(
    action: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["stack", action], root=tmp_path) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"{prog()}: error: the development stack") and lines[0].endswith(INSTALL)
    assert "'redis'" in lines[0]


@pytest.mark.usefixtures("without_redis")
def test_importing_the_stack_without_its_extra_names_it() -> None:
    with pytest.raises(MissingExtra, match=r"pip install 'juicecache\[devstack\]'$") as raised:
        import juicecache.devstack.stack  # noqa: F401
    assert isinstance(raised.value, ImportError)  # code guarding an optional import still catches it
    assert "\n" not in str(raised.value)


def test_a_broken_dependency_keeps_its_own_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An installed dependency that lacks something itself is not reported as a missing extra:
    its own error names what is really missing."""
    (tmp_path / "half_installed").mkdir()
    (tmp_path / "half_installed" / "__init__.py").write_text("import juicecache_absent_module\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError) as raised:
        require("a part", "extra", "half_installed")
    assert raised.type is ModuleNotFoundError and raised.value.name == "juicecache_absent_module"


def test_the_library_imports_neither_the_demo_nor_the_stack() -> None:
    """In a fresh interpreter (this one may have imported them for other tests): the package,
    `cached_task` (which imports Prefect) and `Store`."""
    probe = (
        "import sys, juicecache; juicecache.cached_task, juicecache.shared, juicecache.Store, juicecache.volume_status; "
        "print(sorted(m for m in sys.modules if m.split('.')[:2] in (['juicecache', 'demo'], ['juicecache', 'devstack'])))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
