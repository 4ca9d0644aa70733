"""The command line: `main.py -input ...` runs the demo flow; commands manage the volume, the UI and the cache.

Each command family (`run`, `volume`, `cache`, `status`) builds its parsers and names their
handlers; `main` picks the command from the first argument (none named: the demo run),
parses the rest, loads the settings and calls the handler. Every error a person can cause
or fix ends in one line on stderr and a non-zero exit: 2 for a usage error, 1 for anything
else. Prefect is imported only by the commands that need it, after the settings it reads
at import time are in place.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from juicecache.cli import cache, run, status, volume
from juicecache.cli.common import CliError, UsageError, err, prog
from juicecache.settings import SettingsError, load_settings
from juicecache.volume import VolumeError


def main(argv: Sequence[str] | None = None, root: Path | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    never_world_writable()
    try:
        commands = {**volume.commands(), **cache.commands(), **status.commands()}
        if argv and argv[0] in commands:
            (parser, handler), argv = commands[argv[0]], argv[1:]
        else:
            parser, handler = run.command()
        options = parser.parse_args(argv)
        return handler(load_settings(root), options)
    # Messages are plain text, printed as they are: not Rich markup, which would swallow a
    # `[devstack]` in `pip install 'juicecache[devstack]'` or a bracketed file name.
    except UsageError as exc:
        err.print(f"{prog()}: error: {exc}", markup=False)
        return 2
    except (SettingsError, VolumeError, CliError) as exc:
        err.print(f"{prog()}: error: {exc}", markup=False)
        return 1
    except KeyboardInterrupt:
        err.print(f"{prog()}: interrupted")
        return 130


def never_world_writable() -> None:
    """Whatever a command creates (cache folders, juicefs's log and block cache, Prefect's files)
    is never writable by others, whatever the caller's umask: see docs/security.md."""
    os.umask(os.umask(0) | 0o002)


def console() -> NoReturn:
    """The `juicecache` command `pip install` creates: `python main.py` with the current folder as root."""
    sys.exit(main())
