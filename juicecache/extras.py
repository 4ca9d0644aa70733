"""Optional parts of juicecache and the extras that install what they need.

The library (`cached_task`, `shared`) needs only the package's own dependencies. The
development stack (`juicecache.devstack`) needs more, declared as the `devstack` extra in
pyproject.toml: a library user should not get a Redis client and a SeaweedFS binary for
caching tasks. A part whose extra is not installed fails on import with one line naming
what to install, which the command line prints as its error.
"""

from __future__ import annotations

import importlib


class MissingExtra(ImportError):
    """An optional part's dependency is not installed; the message is one line naming the extra."""


def require(part: str, extra: str, *modules: str) -> None:
    """Import `modules` (top-level names), which `part` needs; if one is not installed, raise
    `MissingExtra` naming `pip install 'juicecache[extra]'`."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise  # it is installed but lacks something itself: its own error says more than ours would
            raise MissingExtra(
                f"{part} needs the Python package {module!r}, which is not installed: "
                f"pip install 'juicecache[{extra}]'"
            ) from None
