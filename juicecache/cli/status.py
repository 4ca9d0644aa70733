"""`status`: the volume, its metadata engine and object storage, the cache folder and the Prefect server.

No Prefect import: it starts in a fraction of a second.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from rich.filesize import decimal
from rich.markup import escape

from juicecache.cli.common import Commands, Parser, invocation, print_json, print_pairs, prog
from juicecache.entryfile import Signer
from juicecache.prefect_server import server_answers
from juicecache.scan import VolumeUsage
from juicecache.settings import Settings, mask_url
from juicecache.volume import MountState, VolumeError, cache_location, mount_info


def commands() -> Commands:
    status = Parser(prog=f"{prog()} status", description="Volume, metadata engine, object storage, cache folder and Prefect server.")
    status.add_argument("--json", action="store_true", help="print one JSON object")
    return {"status": (status, cmd_status)}


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
            results = {"path": str(location.path), "shared": location.on_volume, "read_only": location.read_only}
        except VolumeError as exc:
            results = {"error": str(exc)}
    api = settings.prefect_api_url or os.environ.get("PREFECT_API_URL", "").strip()
    local = f"http://{settings.ui_host}:{settings.ui_port}/api"
    prefect = {"url": mask_url(api or local), "configured": bool(api), "answers": server_answers(api or local, timeout=2)}
    signing = {"enabled": bool(settings.signing_key), "key_id": Signer(settings.signing_key.encode()).key_id}
    report = {
        "volume": volume,
        "metadata": settings.masked_meta_url,
        "storage": storage,
        "results": results,
        "prefect": prefect,
        "signing": signing,
        "strict": settings.require_volume,
    }
    if args.json:
        print_json(report)
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
        if results["read_only"]:
            rows.append(("mode", "[yellow]read-only[/]: hits are served, misses are computed and not stored"))
    if settings.require_volume:
        rows.append(("strict", "JUICECACHE_REQUIRE_VOLUME=1: runs fail instead of caching in a local folder"))
    if prefect["answers"]:
        rows.append(("prefect", f"[green]server answers[/] at {prefect['url']}"))
    elif prefect["configured"]:
        rows.append(("prefect", f"[red]not answering[/] at {prefect['url']} (PREFECT_API_URL)"))
    else:
        rows.append(("prefect", f"no server at {prefect['url']}: runs start a temporary one (`{invocation('ui')}` keeps history)"))
    unsigned = "off: entries are checksummed, not signed (see docs/security.md)"
    rows.append(("signing", f"on (key id {signing['key_id']})" if signing["enabled"] else unsigned))
    print_pairs(rows)
    return 0


def _formatted_storage(mount_point: Path) -> dict[str, str]:
    """The object storage the volume was formatted with, from the mount's `.config` (root only)."""
    try:
        config = json.loads((mount_point / ".config").read_text())["Format"]
        return {"type": config["Storage"], "bucket": mask_url(config["Bucket"]), "from": "volume"}
    except (OSError, ValueError, KeyError, TypeError):
        return {}
