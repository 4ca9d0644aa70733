"""The command line: `main.py -input ...` runs the demo flow; subcommands manage the volume and the UI.

Every error a person can cause or fix ends in one line on stderr and a non-zero exit:
2 for a usage error, 1 for anything else. Prefect is imported only by the commands
that need it, after the settings it reads at import time are in place.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import math
import os
import re
import sys
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

from rich.console import Console

from juicecache.settings import Settings, SettingsError, apply_prefect_settings, load_settings, parse_duration
from juicecache.volume import VolumeError, dead_mount_message, failing_volume_message, mount_volume, unmount_volume

PROG = "main.py"
_INTEGER = re.compile(r"^[-+]?\d+$")
_DECIMAL = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


class UsageError(Exception):
    """Bad command line; exits 2."""


class CliError(Exception):
    """A one-line failure a person can act on; exits 1."""


class _Parser(argparse.ArgumentParser):
    """argparse prints usage plus the error; we want the error alone, on one line."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def run_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Run the demo Prefect flow with its task cached on the shared JuiceFS volume.",
        epilog=f"Other commands: mount, unmount, ui, stack, cache, status (see `{PROG} COMMAND --help`).",
    )
    parser.add_argument(
        "-input", "--input", dest="inputs", nargs="+", required=True, metavar="VALUE",
        help="values for the task, space-separated; 1 and 2.5 are numbers, anything else is text",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the summary")
    parser.add_argument("--refresh", action="store_true", help="recompute and overwrite the cache entry")
    parser.add_argument("--expire", metavar="DURATION", type=_duration, help="the new entry expires after DURATION (30s, 10m, 1h, 7d)")
    parser.add_argument("--verbose", action="store_true", help="also show Prefect's own log lines")
    parser.add_argument("--per-item", action="store_true", help="cache each value separately (a mapped task, run concurrently)")
    return parser


def _duration(text: str) -> str:
    try:
        parse_duration(text)
    except SettingsError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def command_parsers() -> dict[str, argparse.ArgumentParser]:
    mount = _Parser(prog=f"{PROG} mount", description="Format (once) and mount the JuiceFS volume configured in .env.")
    unmount = _Parser(prog=f"{PROG} unmount", description="Unmount the JuiceFS volume; harmless when nothing is mounted.")
    ui = _Parser(prog=f"{PROG} ui", description="Start the Prefect server with its UI (PREFECT_UI_HOST:PREFECT_UI_PORT).")
    stack = _Parser(
        prog=f"{PROG} stack",
        description="Start (up), stop (down) or check (status) a local Redis + SeaweedFS S3 stack serving "
        "the shared profile's JFS_META_URL and JFS_BUCKET. Data lives under .juicecache/stack.",
    )
    stack.add_argument("action", choices=["up", "down", "status"])
    from juicecache.cache_cli import command_parsers as cache_command_parsers  # it builds on this module

    return {"mount": mount, "unmount": unmount, "ui": ui, "stack": stack, **cache_command_parsers()}


def main(argv: Sequence[str] | None = None, root: Path | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    never_world_writable()
    try:
        commands = command_parsers()
        if argv and argv[0] in commands:
            name = argv[0]
            options = commands[name].parse_args(argv[1:])
            settings = load_settings(root)
            if "handler" in options:  # commands whose parser carries its handler
                return options.handler(settings, options)
            return COMMANDS[name](settings, options)
        args = run_parser().parse_args(argv)
        return run_demo(load_settings(root), args)
    except UsageError as exc:
        err.print(f"{PROG}: error: {exc}")
        return 2
    except (SettingsError, VolumeError, CliError) as exc:
        err.print(f"{PROG}: error: {exc}")
        return 1
    except KeyboardInterrupt:
        err.print(f"{PROG}: interrupted")
        return 130


def never_world_writable() -> None:
    """Whatever a command creates (cache folders, juicefs's log and block cache, Prefect's files)
    is never writable by others, whatever the caller's umask: see "Reliability" in README.md."""
    os.umask(os.umask(0) | 0o002)


def run_demo(settings: Settings, args: argparse.Namespace) -> int:
    values = [parse_value(text) for text in args.inputs]
    api = prepare_prefect(settings, verbose=args.verbose)
    _route_warnings()

    from juicecache.cache import activate
    from juicecache.flow import demo_flow

    cache = activate(settings)
    if args.per_item:
        return run_per_item(values, args, cache.refused)
    report = run_flow(demo_flow, values, args)
    if args.json:
        print(json.dumps(report.as_dict(), sort_keys=True))
        return 0
    summary = (
        f"[bold green]cache hit[/]: read in {report.seconds:.3f} s, saved {report.saved_seconds:.1f} s"
        if report.cache == "hit"
        else f"[bold yellow]cache miss[/]: computed in {report.seconds:.3f} s"
    )
    where = f"JuiceFS volume '{report.volume}'" if report.volume else "local folder (not shared)"
    out.print(summary)
    out.print(f"  inputs   {report.inputs}")
    out.print(f"  result   {json.dumps(report.result, sort_keys=True)}")
    out.print(f"  key      {report.key}")
    out.print(f"  entry    {where}: {report.storage}")
    out.print(f"  time     {report.seconds:.3f} s")
    out.print(f"  prefect  {api}")
    if cache.refused:
        out.print(f"  note     {len(cache.refused)} damaged or unsigned entr{'y' if len(cache.refused) == 1 else 'ies'} refused and recomputed")
    return 0


def run_flow(flow: Callable[..., Any], values: list[int | float | str], args: argparse.Namespace) -> Any:
    """Run a demo flow; it re-raises its task's own exception, which becomes one line."""
    try:
        with demo_heartbeats():
            return flow(values, refresh=args.refresh, expire=args.expire)
    except Exception as exc:
        raise CliError(describe_failure(exc)) from None


@contextmanager
def demo_heartbeats() -> Iterator[None]:
    """Prefect's flow-run heartbeats (every 180 s, for detecting crashed runs) are off for the
    demo's runs, unless PREFECT_FLOWS_HEARTBEAT_FREQUENCY is set.

    In Prefect 3.9 the heartbeat thread sleeps in 1 s steps and a flow run waits for it when
    it ends: up to a second, a third of a cached run's wall time (measured: 2.8 s with
    heartbeats, 1.9 s without). A demo run lasts seconds, never long enough to need one.
    The environment cannot express "off" (the setting takes a number of seconds), hence
    Prefect's `temporary_settings`.
    """
    if any(os.environ.get(name, "").strip() for name in ("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "PREFECT_RUNNER_HEARTBEAT_FREQUENCY")):
        yield
        return
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield


def run_per_item(values: list[int | float | str], args: argparse.Namespace, refused: list[tuple[Path, str]]) -> int:
    from juicecache.flow import per_item_flow

    report = run_flow(per_item_flow, values, args)
    if args.json:
        print(json.dumps(report.as_dict(), sort_keys=True))
        return 0
    hits = sum(item.cache == "hit" for item in report.items)
    colour = {"hit": "green", "miss": "yellow"}.get(report.cache, "cyan")
    out.print(
        f"[bold {colour}]per item: {hits} of {len(report.items)} cached[/], "
        f"{len(report.items) - hits} computed, in {report.seconds:.3f} s (saved {report.saved_seconds:.1f} s)"
    )
    for item in report.items:
        out.print(f"  {item.cache:<4}  {json.dumps(item.input)}  {item.key}")
    out.print(f"  result   {json.dumps(report.result, sort_keys=True)}")
    where = f"JuiceFS volume '{report.volume}'" if report.volume else "local folder (not shared)"
    out.print(f"  entries  {where}")
    if refused:
        out.print(f"  note     {len(refused)} damaged or unsigned entr{'y' if len(refused) == 1 else 'ies'} refused and recomputed")
    return 0


def parse_value(text: str) -> int | float | str:
    """`1` -> 1, `2.5` -> 2.5, `1e3` -> 1000.0; anything else (`abc`, `nan`, `1_000`) stays text."""
    if _INTEGER.match(text):
        return int(text)
    if _DECIMAL.match(text):
        number = float(text)
        if math.isfinite(number):
            return number
    return text


def prepare_prefect(settings: Settings, verbose: bool = False) -> str:
    """Point Prefect at a running server if there is one; otherwise it starts a temporary one.

    An explicit PREFECT_API_URL that does not answer is an error, not a silent fallback:
    the runs would go missing from the UI the user is watching.
    """
    apply_prefect_settings(settings)
    if not verbose:
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "CRITICAL")
    explicit = os.environ.get("PREFECT_API_URL", "").strip()
    if explicit:
        if not _answers(explicit, timeout=3):
            raise CliError(
                f"Prefect server not answering at {explicit} (PREFECT_API_URL): start it with "
                f"`{invocation('ui')}`, or unset PREFECT_API_URL to run without one"
            )
        return f"server at {explicit}"
    local = f"http://{settings.ui_host}:{settings.ui_port}/api"
    if _answers(local, timeout=0.3):
        os.environ["PREFECT_API_URL"] = local
        return f"server at {local} (UI: http://{settings.ui_host}:{settings.ui_port})"
    return f"temporary server (start `{invocation('ui')}` to keep run history in the UI)"


def describe_failure(exc: BaseException) -> str:
    from juicecache.cache import active

    if isinstance(exc, OSError) and exc.errno in (errno.ENOTCONN, errno.ECONNABORTED):
        return dead_mount_message(active().settings.mount_point)
    if isinstance(exc, OSError) and exc.errno == errno.EIO and active().location.on_volume:
        return failing_volume_message(active().settings, f"{exc.strerror}: {exc.filename}" if exc.filename else str(exc.strerror))
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def cmd_mount(settings: Settings, options: argparse.Namespace) -> int:
    out.print(mount_volume(settings))
    return 0


def cmd_unmount(settings: Settings, options: argparse.Namespace) -> int:
    out.print(unmount_volume(settings))
    return 0


def cmd_stack(settings: Settings, options: argparse.Namespace) -> int:
    from juicecache.stack import StackError, stack_config, stack_running, start_stack, stop_stack

    try:
        config = stack_config(settings)
        if options.action == "up":
            start_stack(config)
        elif options.action == "down":
            stop_stack(config)
        running = stack_running(config)
    except StackError as exc:
        raise CliError(str(exc)) from None
    out.print(f"redis  {config.meta_url}  {'running' if running['redis'] else 'stopped'}")
    out.print(f"s3     {config.bucket_url}  {'running' if running['s3'] else 'stopped'}")
    return 0 if options.action == "down" or all(running.values()) else 1


def cmd_ui(settings: Settings, options: argparse.Namespace) -> int:
    apply_prefect_settings(settings)
    os.environ.pop("PREFECT_API_URL", None)
    # The UI asks its server where the API is, and Prefect answers from these two settings,
    # not from --host/--port: without them a UI on another port shows another server's runs.
    os.environ["PREFECT_SERVER_API_HOST"] = settings.ui_host
    os.environ["PREFECT_SERVER_API_PORT"] = str(settings.ui_port)
    out.print(f"Prefect UI on http://{settings.ui_host}:{settings.ui_port} (Ctrl-C stops it)")
    sys.stdout.flush()
    os.execv(
        sys.executable,
        [sys.executable, "-m", "prefect", "server", "start", "--host", settings.ui_host, "--port", str(settings.ui_port)],
    )


COMMANDS: dict[str, Callable[[Settings, argparse.Namespace], int]] = {
    "mount": cmd_mount,
    "unmount": cmd_unmount,
    "ui": cmd_ui,
    "stack": cmd_stack,
}


def _answers(api_url: str, timeout: float) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=timeout) as response:
            return response.status == 200
    except (OSError, ValueError):
        return False


def _route_warnings() -> None:
    """juicecache's warnings go to stderr as single lines, also under `--json`."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("warning: %(message)s"))
    logger = logging.getLogger("juicecache")
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    logger.propagate = False


def invocation(*args: str) -> str:
    """How the user runs this command line, for hints: `python main.py ui` or `juicecache ui`."""
    return " ".join(["python", PROG, *args] if PROG.endswith(".py") else [PROG, *args])


def console() -> NoReturn:
    """The `juicecache` command `pip install` creates: `python main.py` with the current folder as root."""
    global PROG
    PROG = "juicecache"
    sys.exit(main())
