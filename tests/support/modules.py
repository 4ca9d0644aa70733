"""Loading a file as Python does, under a module name the test picks: keys must not depend on how the code was loaded."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def load(path: Path, module_name: str):
    """Load a file under any module name, as `python file.py`, an import or Prefect's loader does."""
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[module_name]
    return module
