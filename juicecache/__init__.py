"""juicecache: Prefect task caching shared by every machine that mounts the same JuiceFS volume.

    from juicecache import cached_task

    @cached_task(expire="1d")
    def prepare(day: str) -> dict: ...

The public names are loaded on first use (PEP 562): importing the package stays cheap and
does not import Prefect, so the command line can set Prefect's environment first.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from juicecache.api import VolumeStatus, get_settings, volume_status
    from juicecache.cache import UnhashableInput, cached_task, shared, shared_storage, stable_hash
    from juicecache.settings import Settings
    from juicecache.store import Store

__all__ = [
    "Settings", "Store", "UnhashableInput", "VolumeStatus", "cached_task", "get_settings", "shared", "shared_storage",
    "stable_hash", "volume_status",
]

_FROM_API = {"VolumeStatus", "get_settings", "volume_status"}
_FROM_CACHE = {"UnhashableInput", "cached_task", "shared", "shared_storage", "stable_hash"}


def __getattr__(name: str) -> Any:
    if name in _FROM_API:
        return getattr(importlib.import_module("juicecache.api"), name)
    if name in _FROM_CACHE:
        from juicecache.api import load_cache_module

        return getattr(load_cache_module(), name)
    if name == "Settings":
        return importlib.import_module("juicecache.settings").Settings
    if name == "Store":
        from juicecache.api import load_cache_module

        load_cache_module()  # Prefect's settings first, as for cached_task
        return importlib.import_module("juicecache.store").Store
    raise AttributeError(f"module 'juicecache' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
