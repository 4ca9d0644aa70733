"""`cache report`: hits, misses and what they saved, per task and for the fleet (see `juicecache.report`)."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from rich.filesize import decimal

from juicecache.cli.common import CliError, duration, err, out, print_json, print_pairs, progress_bar
from juicecache.report import ServerUnreachable, TaskReport, build, draw, fetch_runs, totals
from juicecache.scan import Scan
from juicecache.settings import Settings, mask_url, parse_duration


def add_parser(actions: argparse._SubParsersAction) -> None:
    report = actions.add_parser(
        "report", help="hit rate and time saved, per task",
        description="Hits, misses, hit rate, compute time saved and bytes served per task over a window, from the "
        "Prefect server's task runs and the cache's entries; then the fleet's totals. Without a server: the entries alone.",
    )
    report.add_argument("--since", type=duration, default="7d", metavar="DURATION", help="the window (default 7d)")
    report.add_argument("--task", metavar="NAME", help="only this task (its name as in its entries' keys)")
    report.add_argument("--png", type=Path, metavar="FILE", help="also draw the hit rate and time saved over the window")


def cmd_report(settings: Settings, args: argparse.Namespace, found: Scan) -> int:
    since = time.time() - parse_duration(args.since).total_seconds()
    api = settings.prefect_api_url or os.environ.get("PREFECT_API_URL", "").strip() or f"http://{settings.ui_host}:{settings.ui_port}/api"
    try:
        with progress_bar("reading task runs", not args.json) as progress:
            runs = fetch_runs(api, since, progress)
        server = None
    except ServerUnreachable as exc:
        runs, server = None, f"{exc}; showing what the entries alone tell"
        err.print(f"warning: {server.replace(api, mask_url(api))}")
    reports = build(runs, found, args.task)
    fleet = totals(reports)
    if args.png:
        if runs is None:
            raise CliError("--png needs the Prefect server's task runs, and the server did not answer")
        try:
            draw(runs, found, since, args.png, args.task)
        except ImportError:
            raise CliError("--png needs matplotlib: pip install matplotlib") from None
    if args.json:
        print_json({
            "since": args.since, "server": server is None, "tasks": [r.as_dict() for r in reports], "fleet": fleet.as_dict(),
            "png": str(args.png) if args.png else None,
        })
        return 0
    for report in [*reports, fleet]:
        print_pairs([(report.task, _summary(report))])
    if args.png:
        out.print(f"plot written to {args.png}")
    return 0


def _summary(report: TaskReport) -> str:
    stored = f"{report.entries:,} entries, {decimal(report.stored_bytes)}"
    hosts = ", ".join(f"{host} ({count})" for host, count in report.hosts) or "-"
    if report.runs is None:
        return f"{stored}; computed on {hosts}"
    rate = f"{100 * report.hit_rate:.0f}%" if report.hit_rate is not None else "-"
    return (
        f"{report.runs:,} runs: {report.hits:,} hits, {report.misses:,} misses (hit rate {rate}); "
        f"saved {report.saved_seconds:,.1f} s of computing, served {decimal(report.bytes_served or 0)}; "
        f"{stored}; computed on {hosts}"
    )
