"""`cache ls|stats|rm|clear|gc`: see what is cached and bound it.

Output is a table for people and, with `--json`, one JSON object for scripts; long scans
and removals show a progress bar on a terminal. No Prefect import: these commands start
in a fraction of a second.
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

from rich.filesize import decimal
from rich.prompt import Confirm

from juicecache.cli import report as report_command
from juicecache.cli.common import (
    CliError,
    Commands,
    Parser,
    UsageError,
    duration,
    err,
    out,
    parse_size,
    positive_int,
    print_json,
    print_pairs,
    prog,
    progress_bar,
)
from juicecache.cli.run import describe_failure
from juicecache.removal import Removal, RemovalReport, Remover, plan_gc, removable_leftovers, remove_all
from juicecache.scan import Entry, Scan, Stats, VolumeUsage, scan
from juicecache.settings import Settings, parse_duration
from juicecache.volume import cache_location


def commands() -> Commands:
    cache = Parser(prog=f"{prog()} cache", description="See and manage the cache entries on the volume.")
    actions = cache.add_subparsers(dest="action", required=True, metavar="{ls,stats,rm,clear,gc,report}")

    ls = actions.add_parser("ls", help="one row per entry, newest first", description="List cache entries, newest first.")
    ls.add_argument("--limit", type=positive_int, metavar="N", help="show only the N newest entries")

    actions.add_parser("stats", help="entries, sizes, expiry and volume usage", description="Summarize the cache and the volume's usage.")

    rm = actions.add_parser("rm", help="remove entries by key", description="Remove cache entries by key (as `cache ls` shows them).")
    rm.add_argument("keys", nargs="+", metavar="KEY")

    clear = actions.add_parser("clear", help="remove every entry", description="Remove every cache entry (asks first).")
    clear.add_argument("--yes", action="store_true", help="do not ask for confirmation")

    gc = actions.add_parser(
        "gc", help="remove expired, old or excess entries",
        description="Remove entries that can never be hits, expired ones (--expired), old ones (--older-than), "
        "then the oldest until the cache fits --max-size. Entries being computed right now are skipped (a run reading one keeps what it read). "
        "Without options: --expired.",
    )
    gc.add_argument("--expired", action="store_true", help="remove expired entries")
    gc.add_argument("--older-than", type=duration, metavar="DURATION", help="remove entries created more than DURATION ago (7d, 12h)")
    gc.add_argument("--max-size", type=parse_size, metavar="SIZE", help="then remove the oldest entries until the cache is under SIZE (10GB)")
    gc.add_argument("--dry-run", action="store_true", help="show what would be removed; remove nothing")

    report_command.add_parser(actions)

    for parser in actions.choices.values():
        parser.add_argument("--json", action="store_true", help="print one JSON object")
    return {"cache": (cache, cmd_cache)}


def cmd_cache(settings: Settings, args: argparse.Namespace) -> int:
    if args.action == "report":
        return report_command.cmd_report(settings, args, scan_cache(settings, args))
    action = {"ls": cmd_ls, "stats": cmd_stats, "rm": cmd_rm, "clear": cmd_clear, "gc": cmd_gc}[args.action]
    try:
        return action(settings, args)
    except OSError as exc:  # the volume failing mid-command (its metadata engine cut off...): one line, as a run says it
        on_volume = str(exc.filename or "").startswith(str(settings.mount_point))
        raise CliError(describe_failure(exc, settings, on_volume)) from None


def cache_root(settings: Settings) -> Path:
    """The cache folder this host uses: on the volume, or the local fallback (with its warning)."""
    location = cache_location(settings)
    if location.warning:
        err.print(f"warning: {location.warning}")
    return location.path


def scan_cache(settings: Settings, args: argparse.Namespace, full: bool = False) -> Scan:
    root = cache_root(settings)
    with progress_bar("reading new entries", not args.json) as progress:
        return scan(root, progress, full=full)


def cmd_ls(settings: Settings, args: argparse.Namespace) -> int:
    found = scan_cache(settings, args)
    shown = found.entries[: args.limit] if args.limit else found.entries
    if args.json:
        print_json(
            {"root": str(found.root), "total": len(found.entries), "entries": [entry.as_dict(found.scanned_at) for entry in shown]}
        )
        return 0
    if not found.entries:
        out.print(f"no cache entries in {found.root}")
        return 0
    _print_rows(
        ("key", "task", "code", "created", "expires", "size", "host"),
        [
            (
                entry.key, entry.task or "?", entry.code or "-", _when(entry.created), _expiry(entry, found.scanned_at),
                decimal(entry.size), entry.host or "?",
            )
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
        print_json({"root": str(found.root), **stats.as_dict(), "volume": usage.__dict__})
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
    print_pairs(rows)
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
        print_json({"removed": removed, "busy": busy, "missing": missing})
    else:
        for key in removed:
            out.print(f"removed {key}")
        for key in busy:
            err.print(f"{prog()}: {key} is being computed right now: not removed")
        for key in missing:
            err.print(f"{prog()}: no cache entry {key}")
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
        print_json({"root": str(found.root), "dry_run": dry_run, **report.as_dict(), "remaining_bytes": remaining})
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
            "dead writers' temporaries, lone payloads, the lock files of removed entries and week-old task parameters"
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


def _print_rows(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    """Aligned columns, written directly.

    rich's Table measures and wraps every cell: minutes for 100,000 entries. Rows are
    never wrapped or shortened (keys are what `cache rm` takes).
    """
    widths = [max([len(name), *(len(row[column]) for row in rows)]) for column, name in enumerate(header)]
    out.print("  ".join(name.ljust(width) for name, width in zip(header, widths, strict=True)).rstrip(), style="bold", markup=False)
    out.file.write("".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() + "\n" for row in rows))
    out.file.flush()


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
