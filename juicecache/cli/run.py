"""The demo run, `main.py -input ...`: the command line when no other command is named.

Prefect is imported only once its settings (read at import time) are in place.
"""

from __future__ import annotations

import argparse
import atexit
import errno
import json
import logging
import math
import os
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING, Any

from juicecache.cli.common import (
    CliError,
    Handler,
    Parser,
    duration,
    err,
    invocation,
    out,
    prog,
    route_warnings,
)
from juicecache.prefect_server import BackgroundServer, ServerUnavailable, server_answers
from juicecache.settings import Settings, apply_prefect_settings
from juicecache.volume import dead_mount_message, failing_volume_message

if TYPE_CHECKING:  # importing it imports Prefect
    from juicecache.store import Resolved

# The exit code of the demo run this process finished, once it has (see `end_demo_fast`).
_finished: list[int] = []

_INTEGER = re.compile(r"^[-+]?\d+$")
_DECIMAL = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def command() -> tuple[argparse.ArgumentParser, Handler]:
    parser = Parser(
        prog=prog(),
        description="Run the demo Prefect flow with its task cached on the shared JuiceFS volume.",
        epilog=f"Other commands: mount, unmount, ui, server, stack, cache, status (see `{prog()} COMMAND --help`).",
    )
    parser.add_argument(
        "-input", "--input", dest="inputs", nargs="+", required=True, metavar="VALUE",
        help="values for the task, space-separated; 1 and 2.5 are numbers, anything else is text",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the summary")
    parser.add_argument("--refresh", action="store_true", help="recompute and overwrite the cache entry")
    parser.add_argument("--expire", metavar="DURATION", type=duration, help="the new entry expires after DURATION (30s, 10m, 1h, 7d)")
    parser.add_argument("--verbose", action="store_true", help="also show Prefect's own log lines")
    parser.add_argument("--per-item", action="store_true", help="cache each value separately (a mapped task, run concurrently)")
    return parser, run_demo


def run_demo(settings: Settings, args: argparse.Namespace) -> int:
    code = _demo(settings, args)
    _finished.append(code)
    return code


def _demo(settings: Settings, args: argparse.Namespace) -> int:
    values = [parse_value(text) for text in args.inputs]
    api = prepare_prefect(settings, verbose=args.verbose)
    route_warnings()

    from juicecache.cache import activate
    from juicecache.demo.flow import demo_flow

    with one_prefect_client(settings):
        cache = activate(settings)
        if args.per_item:
            return run_per_item(values, args, cache)
        report = run_flow(demo_flow, values, args, cache)
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


def run_per_item(values: list[int | float | str], args: argparse.Namespace, cache: Resolved) -> int:
    from juicecache.demo.flow import per_item_flow

    report = run_flow(per_item_flow, values, args, cache)
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
    if cache.refused:
        out.print(f"  note     {len(cache.refused)} damaged or unsigned entr{'y' if len(cache.refused) == 1 else 'ies'} refused and recomputed")
    return 0


def run_flow(flow: Callable[..., Any], values: list[int | float | str], args: argparse.Namespace, cache: Resolved) -> Any:
    """Run a demo flow; it re-raises its task's own exception, which becomes one line."""
    try:
        with demo_heartbeats():
            return flow(values, refresh=args.refresh, expire=args.expire)
    except Exception as exc:
        raise CliError(describe_failure(exc, cache.settings, on_volume=cache.location.on_volume)) from None


def end_demo_fast() -> None:
    """Let a script (main.py) end without the interpreter's teardown once a demo run finished.

    Call it before the run. The handler it registers runs after every exit handler
    registered later, Prefect's included, and calls the one `import logging` registered
    before it. By then Prefect has sent the run's events and logs (its services drain when
    threads shut down, before any `atexit` handler), and nothing the run wrote waits in a
    Python buffer but what is printed, flushed here. What is left is the teardown of every
    module Prefect loaded (about 1,300) and their objects: 0.3-0.4 s of a cached run's wall
    time, with no effect outside the process. `os._exit` skips it. Only a demo run that
    returned its exit code ends so; any other command, an exception or `sys.exit` ends as
    usual, and so does a process that never called this (a test calling `main`).
    """

    def end() -> None:
        if _finished:
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(_finished[-1])

    atexit.register(end)


@contextmanager
def one_prefect_client(settings: Settings) -> Iterator[None]:
    """One Prefect API client for the whole run: the results block's lookup (`activate`), the
    flow run, its artifact and its tags.

    Without it the lookup opens a client of its own before the flow run opens another, and
    each Prefect client builds a TLS context (certifi's bundle, about 20 ms) and a connection,
    even for an http:// server. The flow run finds this client in Prefect's context and uses it.
    A server that fails Prefect's version check fails here, in one line, as it would in the run.
    """
    from prefect.context import SyncClientContext

    with ExitStack() as stack:
        try:
            stack.enter_context(SyncClientContext.get_or_create())
        except Exception as exc:
            raise CliError(describe_failure(exc, settings, on_volume=False)) from None
        yield


@contextmanager
def demo_heartbeats() -> Iterator[None]:
    """Prefect's flow-run heartbeats (every 180 s, for detecting crashed runs) are off for the
    demo's runs, unless PREFECT_FLOWS_HEARTBEAT_FREQUENCY is set.

    In Prefect 3.9 the heartbeat thread sleeps in 1 s steps and a flow run waits for it when
    it ends: up to a second, a third of a cached run's wall time (measured: 2.8 s with
    heartbeats, 1.9 s without). A demo run lasts seconds, never long enough to need one.
    The environment cannot express "off" (the setting takes a number of seconds), hence a
    settings context. It is a copy of the current settings with that one value changed:
    Prefect's `temporary_settings` would rebuild them from every source (environment,
    profiles, .env, toml files), 35-60 ms of a cached run.
    """
    if any(os.environ.get(name, "").strip() for name in ("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "PREFECT_RUNNER_HEARTBEAT_FREQUENCY")):
        yield
        return
    from prefect.context import SettingsContext, get_settings_context

    current = get_settings_context()
    flows = current.settings.flows.model_copy(update={"heartbeat_frequency": None})
    with SettingsContext(profile=current.profile, settings=current.settings.model_copy(update={"flows": flows})):
        yield


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
    """Point Prefect at a server: PREFECT_API_URL's, else the one on PREFECT_UI_HOST:PREFECT_UI_PORT,
    started in the background if none answers there (see `prefect_server`; not with
    JUICECACHE_BACKGROUND_SERVER=0). Returns what it chose.

    An explicit PREFECT_API_URL that does not answer is an error, not a silent fallback:
    the runs would go missing from the UI the user is watching. A background server that
    cannot start leaves Prefect's temporary one, with one line saying why.
    """
    apply_prefect_settings(settings)
    if not verbose:
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "CRITICAL")
    explicit = os.environ.get("PREFECT_API_URL", "").strip()
    if explicit:
        if not server_answers(explicit, timeout=3):
            raise CliError(
                f"Prefect server not answering at {explicit} (PREFECT_API_URL): start it with "
                f"`{invocation('ui')}`, or unset PREFECT_API_URL to run without one"
            )
        return f"server at {explicit}"
    server = BackgroundServer.of(settings)
    started = ""
    if not server.answers():
        if not settings.background_server:
            return f"temporary server (start `{invocation('ui')}` to keep run history in the UI)"
        try:
            server.start(settings)
        except ServerUnavailable as exc:
            err.print(f"warning: {exc}: using a temporary Prefect server (runs will not stay in a UI)")
            return f"temporary server (start `{invocation('ui')}` to keep run history in the UI)"
        started = f", started in the background (logs: {server.log}; `{invocation('server', 'stop')}` stops it)"
    os.environ["PREFECT_API_URL"] = server.api_url
    return f"server at {server.api_url} (UI: {server.ui_url}){started}"


def describe_failure(exc: BaseException, settings: Settings, on_volume: bool) -> str:
    """One line for a failed run, whose entries went to the volume (`on_volume`) or a local folder."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOTCONN, errno.ECONNABORTED):
        return dead_mount_message(settings.mount_point)
    if isinstance(exc, OSError) and exc.errno == errno.EIO and on_volume:
        return failing_volume_message(settings, f"{exc.strerror}: {exc.filename}" if exc.filename else str(exc.strerror))
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
