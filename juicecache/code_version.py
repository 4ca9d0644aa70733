"""Keys that follow code changes: a digest of the task's code, normalized so only behaviour counts.

`cached_task(code=...)`:
- `"task"` (the default): the task function's own code;
- `"calls"`: that, and the code of every function and class it uses that lives in the
  user's own modules, followed transitively; never into installed packages or the
  standard library (their versions are the environment's business, not the key's);
- `None`: no code in the key (change `version=` by hand).

Prefect's `TASK_SOURCE` hashes the task's source text, so a comment or a blank line
changes the key, and only the task's own body counts. Here the source is parsed and its
AST dumped without positions, docstrings or decorators: comments, blank lines, layout,
docstrings, decorator options and the checkout path never change the key; any change the
interpreter would see does. (The AST's form is Python's: hosts on different minor
versions may compute different digests, which costs misses, never wrong results.)

A fingerprint is computed once per process, when first needed, so that the functions a
task calls may be defined after it; it pickles as its digest, so a Dask worker or a task
worker that has no source file agrees with the process that submitted the task.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import sys
import sysconfig
import textwrap
import threading
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

CodeMode = Literal["task", "calls"]
CODE_MODES = ("task", "calls")
SHORT_DIGEST = 12


class CodeFingerprint:
    """The digest of a function's normalized code (and, with `calls`, of the user code it uses).

    Args:
        fn: the task's function.
        mode: `"task"` or `"calls"` (see the module docstring).
    """

    def __init__(self, fn: Callable[..., Any], mode: CodeMode) -> None:
        if mode not in CODE_MODES:
            raise TypeError(f"cached_task(code=...): {mode!r} is not one of 'task', 'calls' or None")
        self._fn = fn
        self.mode = mode
        self._digest: str | None = None
        self._guard = threading.Lock()

    def digest(self) -> str:
        with self._guard:
            if self._digest is None:
                functions = _user_code(self._fn) if self.mode == "calls" else [self._fn]
                hasher = hashlib.sha256(self.mode.encode())
                for code in sorted(normalized(fn) for fn in functions):
                    hasher.update(code.encode())
                self._digest = hasher.hexdigest()
            return self._digest

    @property
    def short(self) -> str:
        """What `cache ls` shows: the first digits, enough to tell versions apart."""
        return self.digest()[:SHORT_DIGEST]

    def __reduce__(self) -> tuple[Any, ...]:
        return (_computed, (self.mode, self.digest()))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CodeFingerprint) and (self.mode, self.digest()) == (other.mode, other.digest())

    def __hash__(self) -> int:
        return hash((self.mode, self.digest()))


def _computed(mode: CodeMode, digest: str) -> CodeFingerprint:
    fingerprint = CodeFingerprint.__new__(CodeFingerprint)
    fingerprint._fn, fingerprint.mode, fingerprint._digest, fingerprint._guard = None, mode, digest, threading.Lock()
    return fingerprint


def normalized(obj: Any) -> str:
    """The AST of a function or class, without positions, docstrings or decorators."""
    try:
        source = textwrap.dedent(inspect.getsource(obj))
    except (OSError, TypeError):  # no source (built in, or made by exec): its bytecode, minus positions
        code = getattr(obj, "__code__", None)
        return _bytecode(code) if code else f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', '')}"
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            node.decorator_list = []
            if node.body and _is_docstring(node.body[0]):
                node.body = node.body[1:] or [ast.Pass()]
    return ast.dump(tree, annotate_fields=False, include_attributes=False)


def _bytecode(code: types.CodeType) -> str:
    """A code object's instructions, names and constants, nested code included: what it does,
    without its positions or the addresses `repr` would show for nested code objects."""
    constants = [_bytecode(c) if isinstance(c, types.CodeType) else repr(c) for c in code.co_consts]
    return repr((code.co_code, constants, code.co_names))


def _is_docstring(statement: ast.stmt) -> bool:
    return isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant) and isinstance(statement.value.value, str)


def _user_code(fn: Callable[..., Any]) -> list[Any]:
    """`fn` and the user-defined functions and classes it reaches through the names it uses."""
    found: dict[int, Any] = {}
    pending = [inspect.unwrap(fn)]
    while pending:
        current = pending.pop()
        if id(current) in found:
            continue
        found[id(current)] = current
        pending.extend(used for used in _referenced(current) if id(used) not in found and is_user_code(used))
    return list(found.values())


def _referenced(obj: Any) -> Iterator[Any]:
    """The objects `obj`'s code names: globals, closure variables, and `module.attribute`."""
    functions = [obj] if inspect.isfunction(obj) else [f for f in vars(obj).values() if inspect.isfunction(f)]
    for function in functions:
        scope = {**function.__globals__, **inspect.getclosurevars(function).nonlocals}
        for code in _code_objects(function.__code__):
            for name in code.co_names + code.co_freevars:
                value = scope.get(name)
                if isinstance(value, types.ModuleType):
                    yield from (getattr(value, attr) for attr in code.co_names if hasattr(value, attr))
                elif value is not None:
                    yield getattr(value, "fn", value)  # a Prefect task: its function


def _code_objects(code: types.CodeType) -> Iterator[types.CodeType]:
    yield code
    for constant in code.co_consts:
        if isinstance(constant, types.CodeType):
            yield from _code_objects(constant)


def is_user_code(obj: Any) -> bool:
    """A function or class defined in a file outside the interpreter's and the installed packages' folders."""
    if not (inspect.isfunction(obj) or inspect.isclass(obj)):
        return False
    module = sys.modules.get(getattr(obj, "__module__", "") or "")
    filename = getattr(module, "__file__", None) if module else None
    if not filename:
        return inspect.isfunction(obj) and obj.__code__.co_filename.endswith(".py")
    path = Path(filename).resolve()
    return not any(path.is_relative_to(folder) for folder in _installed_folders())


def _installed_folders() -> list[Path]:
    names = ("stdlib", "platstdlib", "purelib", "platlib")
    paths = sysconfig.get_paths()
    return [Path(paths[name]).resolve() for name in names if name in paths]
