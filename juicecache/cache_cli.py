"""The `cache` and `status` commands: see what is cached, bound it, and check the setup.

Output is a table for people and, with `--json`, one JSON object for scripts;
long scans and removals show a progress bar on a terminal. No Prefect import: these
commands start in a fraction of a second.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.filesize import decimal
from rich.markup import escape
from rich.measure import Measurement
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.prompt import Confirm
from rich.table import Table

from juicecache.cli import PROG, CliError, UsageError, _answers, _duration, _Parser, err, out
from juicecache.entries import (
    Entry,
    Removal,
    RemovalReport,
    Remover,
    Scan,
    Stats,
    VolumeUsage,
    plan_gc,
    removable_leftovers,
    remove_all,
    scan,
)
from juicecache.entryfile import Signer
from juicecache.settings import Settings, mask_url, parse_duration
from juicecache.volume import MountState, VolumeError, cache_location, mount_info

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?)b?\s*$", re.IGNORECASE)
_UNITS = "kmgtp"


def parse_size(text: str) -> int:
    """`10GB`, `500M`, `1.5GiB`, `4096` -> bytes (decimal units; `i` for binary ones)."""
    match = _SIZE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: use a number with B, KB, MB, GB or TB, e.g. 10GB")
    number, unit, binary = match.groups()
    base = 1024 if binary else 1000
    return int(float(number) * base ** (_UNITS.index(unit.lower()) + 1 if unit else 0))


def command_parsers() -> dict[str, argparse.ArgumentParser]:
    """`cache ls|stats|rm|clear|gc` and `status`; each parser carries its handler."""
    cache = _Parser(prog=f"{PROG} cache", description="See and manage the cache entries on the volume.")
    actions = cache.add_subparsers(dest="action", required=True, metavar="{ls,stats,rm,clear,gc}")

    ls = actions.add_parser("ls", help="one row per entry, newest first", description="List cache entries, newest first.")
    ls.add_argument("--limit", type=_positive_int, metavar="N", help="show only the N newest entries")
    ls.set_defaults(handler=cmd_ls)

    stats = actions.add_parser("stats", help="entries, sizes, expiry and volume usage", description="Summarize the cache and the volume's usage.")
    stats.set_defaults(handler=cmd_stats)

    rm = actions.add_parser("rm", help="remove entries by key", description="Remove cache entries by key (as `cache ls` shows them).")
    rm.add_argument("keys", nargs="+", metavar="KEY")
    rm.set_defaults(handler=cmd_rm)

    clear = actions.add_parser("clear", help="remove every entry", description="Remove every cache entry (asks first).")
    clear.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    clear.set_defaults(handler=cmd_clear)

    gc = actions.add_parser(
        "gc", help="remove expired, old or excess entries",
        description="Remove entries that can never be hits, expired ones (--expired), old ones (--older-than), "
        "then the oldest until the cache fits --max-size. Entries being computed or read right now are skipped. "
        "Without options: --expired.",
    )
    gc.add_argument("--expired", action="store_true", help="remove expired entries")
    gc.add_argument("--older-than", type=_duration, metavar="DURATION", help="remove entries created more than DURATION ago (7d, 12h)")
    gc.add_argument("--max-size", type=parse_size, metavar="SIZE", help="then remove the oldest entries until the cache is under SIZE (10GB)")
    gc.add_argument("--dry-run", action="store_true", help="show what would be removed; remove nothing")
    gc.set_defaults(handler=cmd_gc)

    status = _Parser(prog=f"{PROG} status", description="Volume, metadata engine, object storage, cache folder and Prefect server.")
    status.set_defaults(handler=cmd_status)

    for parser in (ls, stats, rm, clear, gc, status):
        parser.add_argument("--json", action="store_true", help="print one JSON object")
    return {"cache": cache, "status": status}


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return int(text)


# --- cache ---------------------------------------------------------------------------


def cache_root(settings: Settings) -> Path:
    """The cache folder this host uses: on the volume, or the local fallback (with its warning)."""
    location = cache_location(settings)
    if location.warning:
        err.print(f"warning: {location.warning}")
    return location.path


@contextmanager
def progress_bar(description: str, enabled: bool) -> Iterator[Callable[[int, int], None]]:
    """A transient bar on stderr, only on a terminal: scripts and `--json` get clean output."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err, transient=True, disable=not (enabled and err.is_terminal)) as bar:
        task = bar.add_task(description, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


def scan_cache(settings: Settings, args: argparse.Namespace, full: bool = False) -> Scan:
    root = cache_root(settings)
    with progress_bar("reading new entries", not args.json) as progress:
        return scan(root, progress, full=full)


def cmd_ls(settings: Settings, args: argparse.Namespace) -> int:
    found = scan_cache(settings, args)
    shown = found.entries[: args.limit] if args.limit else found.entries
    if args.json:
        _print_json(
            {"root": str(found.root), "total": len(found.entries), "entries": [entry.as_dict(found.scanned_at) for entry in shown]}
        )
        return 0
    if not found.entries:
        out.print(f"no cache entries in {found.root}")
        return 0
    _print_rows(
        ("key", "task", "created", "expires", "size", "host"),
        [
            (entry.key, entry.task or "?", _when(entry.created), _expiry(entry, found.scanned_at), decimal(entry.size), entry.host or "?")
            for entry in shown
        ],
    )
    out.print(f"{len(shown):,} of {len(found.entries):,} entries, {decimal(found.total_bytes)} in {found.root}")
    return 0


def cmd_stats(settings: Settings, args: argparse.Namespace) -> int:
    found = scan_cache(settings, args)
    stats = Stats.of(found)
    usage = VolumeUsage.of(found.root)
    if args.json:
        _print_json({"root": str(found.root), **stats.as_dict(), "volume": usage.__dict__})
        return 0
    rows = [
        ("entries", f"{stats.entries:,}"),
        ("size", decimal(stats.total_bytes)),
        ("expired", f"{stats.expired:,}"),
        ("unusable", f"{stats.damaged:,} (damaged, incomplete, or a failed run's result: `cache gc` removes them)"),
        ("oldest", _when(stats.oldest)),
        ("newest", _when(stats.newest)),
        (
            "volume",
            f"{decimal(usage.used_bytes)} used of {decimal(usage.total_bytes)}, "
            f"{decimal(usage.free_bytes)} free, {usage.used_inodes:,} files",
        ),
        ("folder", str(found.root)),
    ]
    _print_pairs(rows)
    return 0


def cmd_rm(settings: Settings, args: argparse.Namespace) -> int:
    for key in args.keys:
        if not re.fullmatch(r"[A-Za-z0-9_-]+", key):
            raise UsageError(f"invalid cache key {key!r}")
    remover = Remover(cache_root(settings))
    removed: list[str] = []
    busy: list[str] = []
    missing: list[str] = []
    for key in args.keys:
        outcome = remover.remove(key)
        {"removed": removed, "busy": busy, "missing": missing}[outcome.value].append(key)
    if args.json:
        _print_json({"removed": removed, "busy": busy, "missing": missing})
    else:
        for key in removed:
            out.print(f"removed {key}")
        for key in busy:
            err.print(f"{PROG}: {key} is being computed or read right now: not removed")
        for key in missing:
            err.print(f"{PROG}: no cache entry {key}")
    return 0 if not (busy or missing) else 1


def cmd_clear(settings: Settings, args: argparse.Namespace) -> int:
    found = scan_cache(settings, args, full=True)
    if not args.yes and not _confirm(f"Remove all {len(found.entries):,} cache entries ({decimal(found.total_bytes)}) from {found.root}?"):
        raise CliError("nothing removed (pass --yes to skip the question)")
    removals = [Removal(entry, "clear") for entry in found.entries]
    return _remove(found, removals, args, dry_run=False)


def cmd_gc(settings: Settings, args: argparse.Namespace) -> int:
    found = scan_cache(settings, args, full=True)
    older_than = parse_duration(args.older_than).total_seconds() if args.older_than else None
    expired = args.expired or (older_than is None and args.max_size is None)
    removals = plan_gc(found, expired=expired, older_than=older_than, max_size=args.max_size)
    return _remove(found, removals, args, dry_run=args.dry_run)


def _remove(found: Scan, removals: list[Removal], args: argparse.Namespace, dry_run: bool) -> int:
    leftovers = removable_leftovers(found)
    if dry_run:
        report = RemovalReport(
            removed=[(r.entry.key, r.reason, r.entry.size) for r in removals],
            leftovers_removed=len(leftovers),
            leftover_bytes=sum(leftover.size for leftover in leftovers),
        )
    else:
        with progress_bar("removing entries", not args.json) as progress:
            report = remove_all(Remover(found.root), removals, leftovers, progress)
    remaining = found.total_bytes - sum(size for _, _, size in report.removed)
    if args.json:
        _print_json({"root": str(found.root), "dry_run": dry_run, **report.as_dict(), "remaining_bytes": remaining})
        return 0
    verb = "would remove" if dry_run else "removed"
    by_key = {r.entry.key: r.entry for r in removals}
    if report.removed:
        _print_rows(
            ("key", "task", "created", "size", "why"),
            [(key, by_key[key].task or "?", _when(by_key[key].created), decimal(size), reason) for key, reason, size in report.removed],
        )
    out.print(f"{verb} {len(report.removed):,} entries, {decimal(sum(s for _, _, s in report.removed))}; {decimal(remaining)} remain in {found.root}")
    if report.leftovers_removed:
        out.print(
            f"{verb} {report.leftovers_removed:,} leftover files ({decimal(report.leftover_bytes)}): "
            "dead writers' temporaries, lone payloads and the lock files of removed entries"
        )
    if report.skipped:
        out.print(f"skipped {len(report.skipped):,} entries in use or rewritten meanwhile (they stay)")
    return 0


def _confirm(question: str) -> bool:
    try:
        return Confirm.ask(question, console=err, default=False)
    except EOFError:  # nobody to answer
        err.print()
        return False


# --- status --------------------------------------------------------------------------


def cmd_status(settings: Settings, args: argparse.Namespace) -> int:
    info = mount_info(settings.mount_point)
    volume = {
        "state": info.state.value,
        "name": info.volume_name or settings.volume_name,
        "mount_point": str(info.mount_point),
    }
    storage = {"type": settings.storage, "bucket": settings.masked_bucket, "from": "settings"}
    results: dict[str, Any] = {}
    if info.state is MountState.LIVE:
        storage = {**storage, **_formatted_storage(info.mount_point)}
        volume["usage"] = VolumeUsage.of(info.mount_point).__dict__
    if info.state is not MountState.DEAD:
        try:
            location = cache_location(settings)
            results = {"path": str(location.path), "shared": location.on_volume}
        except VolumeError as exc:
            results = {"error": str(exc)}
    api = settings.prefect_api_url or os.environ.get("PREFECT_API_URL", "").strip()
    local = f"http://{settings.ui_host}:{settings.ui_port}/api"
    prefect = {"url": mask_url(api or local), "configured": bool(api), "answers": _answers(api or local, timeout=2)}
    signing = {"enabled": bool(settings.signing_key), "key_id": Signer(settings.signing_key.encode()).key_id}
    report = {
        "volume": volume,
        "metadata": settings.masked_meta_url,
        "storage": storage,
        "results": results,
        "prefect": prefect,
        "signing": signing,
    }
    if args.json:
        _print_json(report)
        return 0
    state = {
        MountState.LIVE: f"[green]mounted[/] at {info.mount_point}",
        MountState.ABSENT: f"[yellow]not mounted[/] at {info.mount_point} (./start_juice.sh mounts it)",
        MountState.DEAD: f"[red]dead mount[/] at {info.mount_point} (./stop_juice.sh then ./start_juice.sh)",
        MountState.FOREIGN: f"[red]{info.fstype} mount[/] at {info.mount_point}, not JuiceFS",
    }[info.state]
    rows = [
        ("volume", f"JuiceFS {volume['name']!r} {state}"),
        ("metadata", settings.masked_meta_url),
        ("storage", f"{storage['type']} {storage['bucket']}" + ("" if storage["from"] == "volume" else " (from the settings)")),
    ]
    if "usage" in volume:
        usage = volume["usage"]
        rows.append(("usage", f"{decimal(usage['used_bytes'])} used, {decimal(usage['free_bytes'])} free, {usage['used_inodes']:,} files"))
    if "error" in results:
        rows.append(("results", f"[red]{escape(results['error'])}[/]"))
    elif results:
        rows.append(("results", f"{results['path']} ({'shared on the volume' if results['shared'] else 'local folder, not shared'})"))
    if prefect["answers"]:
        rows.append(("prefect", f"[green]server answers[/] at {prefect['url']}"))
    elif prefect["configured"]:
        rows.append(("prefect", f"[red]not answering[/] at {prefect['url']} (PREFECT_API_URL)"))
    else:
        rows.append(("prefect", f"no server at {prefect['url']}: runs start a temporary one (`python main.py ui` keeps history)"))
    unsigned = "off: entries are checksummed, not signed (see README, Security)"
    rows.append(("signing", f"on (key id {signing['key_id']})" if signing["enabled"] else unsigned))
    _print_pairs(rows)
    return 0


def _formatted_storage(mount_point: Path) -> dict[str, str]:
    """The object storage the volume was formatted with, from the mount's `.config` (root only)."""
    try:
        config = json.loads((mount_point / ".config").read_text())["Format"]
        return {"type": config["Storage"], "bucket": mask_url(config["Bucket"]), "from": "volume"}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


# --- output helpers ------------------------------------------------------------------


def _print_json(value: object) -> None:
    print(json.dumps(value, sort_keys=True))


def _print_pairs(rows: list[tuple[str, str]]) -> None:
    table = Table(box=None, show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for name, value in rows:
        table.add_row(name, value)
    _print_table(table)


def _print_rows(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    """Aligned columns, written directly.

    rich's Table measures and wraps every cell: minutes for 100,000 entries. Rows are
    never wrapped or shortened (keys are what `cache rm` takes).
    """
    widths = [max([len(name), *(len(row[column]) for row in rows)]) for column, name in enumerate(header)]
    out.print("  ".join(name.ljust(width) for name, width in zip(header, widths, strict=True)).rstrip(), style="bold", markup=False)
    out.file.write("".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() + "\n" for row in rows))
    out.file.flush()


def _print_table(table: Table) -> None:
    """Fit a terminal; into a pipe, print whole lines (a pipe has no width to wrap to)."""
    if out.is_terminal:
        out.print(table)
    else:
        width = Measurement.get(out, out.options.update(width=100_000), table).maximum
        Console(file=out.file, highlight=False, width=max(width, out.width)).print(table)


def _when(timestamp: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp)) if timestamp is not None else "?"


def _expiry(entry: Entry, now: float) -> str:
    if entry.problem:
        return entry.problem
    if entry.expires is None:
        return "never"
    if entry.expires <= now:
        return "expired"
    return f"in {_span(entry.expires - now)}"


def _span(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"

