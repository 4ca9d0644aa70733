"""The volume and its surroundings: `mount`, `unmount`, `ui` and `server` (the Prefect server) and `stack`."""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING

from juicecache.cli.common import CliError, Commands, Parser, out, prog
from juicecache.extras import MissingExtra
from juicecache.prefect_server import BackgroundServer
from juicecache.settings import Settings, apply_prefect_settings
from juicecache.volume import mount_volume, unmount_volume

if TYPE_CHECKING:
    from juicecache.devstack.stack import StackConfig


def commands() -> Commands:
    mount = Parser(prog=f"{prog()} mount", description="Format (once) and mount the JuiceFS volume configured in .env.")
    unmount = Parser(prog=f"{prog()} unmount", description="Unmount the JuiceFS volume; harmless when nothing is mounted.")
    ui = Parser(prog=f"{prog()} ui", description="Start the Prefect server with its UI (PREFECT_UI_HOST:PREFECT_UI_PORT).")
    stack = Parser(
        prog=f"{prog()} stack",
        description="Start (up), stop (down) or check (status) a local Redis (or PostgreSQL, when JFS_META_URL "
        "is postgres://...) + SeaweedFS S3 stack serving the shared profile's JFS_META_URL and JFS_BUCKET. "
        "Data lives under .juicecache/stack.",
    )
    stack.add_argument("action", choices=["up", "down", "status"])
    server = Parser(
        prog=f"{prog()} server",
        description="Stop (stop) or check (status) the Prefect server that demo runs start in the background.",
    )
    server.add_argument("action", choices=["stop", "status"])
    return {
        "mount": (mount, cmd_mount), "unmount": (unmount, cmd_unmount), "ui": (ui, cmd_ui), "stack": (stack, cmd_stack),
        "server": (server, cmd_server),
    }


def cmd_mount(settings: Settings, options: argparse.Namespace) -> int:
    out.print(mount_volume(settings))
    return 0


def cmd_unmount(settings: Settings, options: argparse.Namespace) -> int:
    out.print(unmount_volume(settings))
    return 0


def cmd_stack(settings: Settings, options: argparse.Namespace) -> int:
    try:
        from juicecache.devstack.stack import StackError, stack_config, stack_running, start_stack, stop_stack
    except MissingExtra as exc:
        raise CliError(str(exc)) from None
    try:
        config = stack_config(settings)
        if options.action == "up":
            start_stack(config)
        elif options.action == "down":
            stop_stack(config)
        running = stack_running(config)
    except StackError as exc:
        raise CliError(str(exc)) from None
    where = {"redis": config.meta_url, "postgres": config.postgres_meta_url if config.postgres_port else "", "s3": config.bucket_url}
    for name, answers in running.items():
        out.print(f"{name:<8} {where[name]}  {'running' if answers else 'stopped'}")
    if options.action == "up" and running.get("postgres"):
        _print_postgres_settings(config)
    return 0 if options.action == "down" or all(running.values()) else 1


def _print_postgres_settings(config: StackConfig) -> None:
    """The .env lines for JuiceFS and the Prefect server on this PostgreSQL; passwords by where they are."""
    from juicecache.devstack.stack import PREFECT_DB, PREFECT_PASSWORD_ENV, postgres_password

    def source(role: str, setting: str) -> str:
        _, path = postgres_password(config, role)
        return f"<the password in {path} (0600)>" if path else f"<your {setting}, already set>"

    out.print("Settings for .env on every host (JuiceFS metadata) and the Prefect server's host (its database):")
    out.print(f"  JFS_META_URL={config.postgres_meta_url}")
    out.print(f"  META_PASSWORD={source(config.postgres_user, 'META_PASSWORD')}")
    out.print(f"  {PREFECT_PASSWORD_ENV}={source(PREFECT_DB, PREFECT_PASSWORD_ENV)}")
    out.print(f"  PREFECT_SERVER_DATABASE_CONNECTION_URL={config.prefect_database_url}")


def cmd_server(settings: Settings, options: argparse.Namespace) -> int:
    server = BackgroundServer.of(settings)
    if options.action == "stop":
        out.print(f"Prefect server at {server.ui_url} stopped" if server.stop() else "no background Prefect server was running")
        return 0
    running = server.answers(timeout=2)
    out.print(f"Prefect server at {server.ui_url}: {'answers' if running else 'not running'}")
    return 0 if running else 1


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
