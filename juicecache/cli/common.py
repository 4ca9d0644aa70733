"""What every command shares: the program's name, the consoles, errors, argument types and output helpers.

Every error a person can cause or fix ends in one line on stderr and a non-zero exit:
2 for a usage error (`UsageError`), 1 for anything else (`CliError`).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

from rich.console import Console
from rich.measure import Measurement
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from juicecache.settings import Settings, SettingsError, parse_duration

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

Handler = Callable[[Settings, argparse.Namespace], int]
Commands = dict[str, tuple[argparse.ArgumentParser, Handler]]
"""A command family: each command's name, its parser, and the handler that runs it."""

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?)b?\s*$", re.IGNORECASE)
_UNITS = "kmgtp"


class UsageError(Exception):
    """Bad command line; exits 2."""


class CliError(Exception):
    """A one-line failure a person can act on; exits 1."""


class Parser(argparse.ArgumentParser):
    """argparse prints usage plus the error; we want the error alone, on one line."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def prog() -> str:
    """The program's name in usage lines, errors and hints: `juicecache` when started by the
    command `pip install` creates (see [project.scripts]), `main.py` otherwise."""
    return "juicecache" if Path(sys.argv[0]).name == "juicecache" else "main.py"


def invocation(*args: str) -> str:
    """How the user runs this command line, for hints: `python main.py ui` or `juicecache ui`."""
    name = prog()
    return " ".join(["python", name, *args] if name.endswith(".py") else [name, *args])


# --- argument types ------------------------------------------------------------------


def duration(text: str) -> str:
    """A duration (30s, 10m, 1h, 7d), checked and kept as text."""
    try:
        parse_duration(text)
    except SettingsError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def parse_size(text: str) -> int:
    """`10GB`, `500M`, `1.5GiB`, `4096` -> bytes (decimal units; `i` for binary ones)."""
    match = _SIZE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: use a number with B, KB, MB, GB or TB, e.g. 10GB")
    number, unit, binary = match.groups()
    base = 1024 if binary else 1000
    return int(float(number) * base ** (_UNITS.index(unit.lower()) + 1 if unit else 0))


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return int(text)


# --- the Prefect server and juicecache's warnings -------------------------------------


def route_warnings() -> None:
    """juicecache's warnings go to stderr as single lines, also under `--json`."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("warning: %(message)s"))
    logger = logging.getLogger("juicecache")
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    logger.propagate = False


# --- output --------------------------------------------------------------------------


def print_json(value: object) -> None:
    print(json.dumps(value, sort_keys=True))


def print_pairs(rows: list[tuple[str, str]]) -> None:
    """Name-value rows; on a terminal they fit its width, into a pipe every line is whole
    (a pipe has no width to wrap to)."""
    table = Table(box=None, show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for name, value in rows:
        table.add_row(name, value)
    if out.is_terminal:
        out.print(table)
    else:
        width = Measurement.get(out, out.options.update(width=100_000), table).maximum
        Console(file=out.file, highlight=False, width=max(width, out.width)).print(table)


@contextmanager
def progress_bar(description: str, enabled: bool) -> Iterator[Callable[[int, int], None]]:
    """A transient bar on stderr, only on a terminal: scripts and `--json` get clean output."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err, transient=True, disable=not (enabled and err.is_terminal)) as bar:
        task = bar.add_task(description, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)
