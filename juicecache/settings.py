"""Configuration: `.env` plus the environment, resolved once into a `Settings` object.

Every setting is documented in `.env.example`. Values already in the environment win
over `.env`, so a test or a second host can override any single one of them. Secrets
are kept out of `repr()` and masked wherever a setting is shown.
"""

from __future__ import annotations

import io
import os
import re
import shlex
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from dotenv import dotenv_values

# Relative paths in settings are relative to the project root, which is the folder
# holding `.env` (the repository for `python main.py`, the current folder otherwise).
ROOT_ENV = "JUICECACHE_ROOT"
ENV_FILE_ENV = "JUICECACHE_ENV_FILE"
STATE_DIR = ".juicecache"

DEFAULTS: dict[str, str] = {
    "JFS_NAME": "juicecache",
    "JFS_META_URL": f"sqlite3://{STATE_DIR}/meta/juicecache.db",
    "JFS_STORAGE": "file",
    "JFS_BUCKET": f"{STATE_DIR}/objects/",
    "JFS_ACCESS_KEY": "",
    "JFS_SECRET_KEY": "",
    "JFS_MOUNT_POINT": f"{STATE_DIR}/mnt",
    "JFS_CACHE_DIR": f"{STATE_DIR}/cache",
    "JFS_MOUNT_OPTIONS": "",
    "META_PASSWORD": "",
    "JUICECACHE_RESULTS_DIR": "prefect-cache",
    "JUICECACHE_FALLBACK_DIR": f"{STATE_DIR}/local-cache",
    "JUICECACHE_SIGNING_KEY": "",
    "JUICECACHE_LOCK_TIMEOUT": "300",
    "JUICECACHE_REQUIRE_VOLUME": "0",
    "JUICECACHE_READ_ONLY": "0",
    "JUICECACHE_BACKGROUND_SERVER": "1",
    "JUICECACHE_DEMO_SECONDS": "3",
    "PREFECT_HOME": f"{STATE_DIR}/prefect",
    "PREFECT_API_URL": "",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_UI_V2_ENABLED": "false",
    "PREFECT_LOGGING_LEVEL": "INFO",
    "PREFECT_UI_HOST": "127.0.0.1",
    "PREFECT_UI_PORT": "4200",
}

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


class SettingsError(ValueError):
    """A setting is missing or malformed; the message is one line naming it."""


@dataclass(frozen=True)
class Settings:
    """Resolved settings. Paths are absolute; secrets never appear in `repr()`."""

    root: Path
    env_file: Path
    volume_name: str
    meta_url: str = field(repr=False)
    storage: str
    bucket: str
    mount_point: Path
    cache_dir: Path
    mount_options: tuple[str, ...]
    results_dir: str
    fallback_dir: Path
    lock_timeout: float
    require_volume: bool  # fail instead of caching in the local fallback folder
    read_only: bool  # serve hits, write nothing (a consumer that must not change the cache)
    background_server: bool  # demo runs start a Prefect server in the background when none answers
    demo_seconds: float  # how long the demo's task pretends to compute: what a hit saves
    prefect_home: Path
    prefect_api_url: str
    ui_host: str
    ui_port: int
    access_key: str = field(repr=False, default="")
    secret_key: str = field(repr=False, default="")
    meta_password: str = field(repr=False, default="")
    signing_key: str = field(repr=False, default="")

    @property
    def masked_meta_url(self) -> str:
        return mask_url(self.meta_url)

    @property
    def masked_bucket(self) -> str:
        return mask_url(self.bucket)

    def secrets(self) -> list[str]:
        """Every secret value in use, so outputs can be checked and scrubbed."""
        password = urlsplit(self.meta_url).password if "://" in self.meta_url else None
        values = [self.access_key, self.secret_key, self.meta_password, self.signing_key]
        return [v for v in [*values, password] if v]

    def juicefs_env(self) -> dict[str, str]:
        """Environment for `juicefs`: it reads these secrets itself, so `ps` never shows them."""
        env = dict(os.environ)
        for name, value in (
            ("ACCESS_KEY", self.access_key),
            ("SECRET_KEY", self.secret_key),
            ("META_PASSWORD", self.meta_password),
        ):
            if value:
                env[name] = value
        return env


def mask_url(url: str) -> str:
    """Hide the password of a URL such as `redis://:secret@host:6379/1`."""
    if "://" not in url:
        return url
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    netloc = f"{user}:****@{parts.hostname or ''}"
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


def parse_duration(text: str) -> timedelta:
    """`30s`, `5m`, `1h`, `7d`, `2w` (a bare number means seconds)."""
    if re.fullmatch(r"\s*\d+(?:\.\d+)?\s*", text):
        text = f"{text}s"
    match = _DURATION.match(text)
    if not match or float(match.group(1)) <= 0:
        raise SettingsError(
            f"invalid duration {text!r}: use a positive number with s, m, h, d or w, e.g. 30s or 1h"
        )
    return timedelta(seconds=float(match.group(1)) * _DURATION_UNITS[match.group(2)])


def project_root(default: Path | None = None) -> Path:
    """`JUICECACHE_ROOT` if set, else `default` (the repository for main.py), else the current folder."""
    return Path(os.environ.get(ROOT_ENV) or default or Path.cwd()).resolve()


def load_env_file(root: Path) -> Path:
    """Load `.env` into the process environment without overriding what is already set.

    Child processes (`juicefs`, the Prefect server) then see the same values.
    """
    env_file = Path(os.environ.get(ENV_FILE_ENV) or root / ".env")
    if not env_file.is_absolute():
        env_file = root / env_file
    if not env_file.exists():
        if ENV_FILE_ENV in os.environ:
            raise SettingsError(f"{ENV_FILE_ENV}: {env_file} does not exist")
        return env_file
    try:
        # Read it ourselves so an unreadable file is reported in one line.
        text = env_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise SettingsError(f"cannot read {env_file}: {reason}") from None
    for name, value in dotenv_values(stream=io.StringIO(text)).items():
        if value is not None and name not in os.environ:
            os.environ[name] = value
    return env_file


def load_settings(root: Path | None = None) -> Settings:
    """Read `.env` (environment wins), apply defaults and resolve paths."""
    root = project_root(root)
    env_file = load_env_file(root)

    def get(name: str) -> str:
        return os.environ.get(name, DEFAULTS[name]).strip() or DEFAULTS[name]

    def path(name: str) -> Path:
        return _resolve(root, Path(get(name)).expanduser())

    storage = get("JFS_STORAGE")
    bucket = get("JFS_BUCKET")
    if storage == "file":
        bucket = str(_resolve(root, Path(bucket).expanduser())) + "/"
    try:
        mount_options = tuple(shlex.split(get("JFS_MOUNT_OPTIONS")))
    except ValueError as exc:
        raise SettingsError(f"JFS_MOUNT_OPTIONS: {exc}") from None

    return Settings(
        root=root,
        env_file=env_file,
        volume_name=_volume_name(get("JFS_NAME")),
        meta_url=_resolve_meta_url(root, get("JFS_META_URL")),
        storage=storage,
        bucket=bucket,
        mount_point=path("JFS_MOUNT_POINT"),
        cache_dir=path("JFS_CACHE_DIR"),
        mount_options=mount_options,
        results_dir=_results_dir(get("JUICECACHE_RESULTS_DIR")),
        fallback_dir=path("JUICECACHE_FALLBACK_DIR"),
        lock_timeout=_positive_float("JUICECACHE_LOCK_TIMEOUT", get("JUICECACHE_LOCK_TIMEOUT")),
        require_volume=_flag("JUICECACHE_REQUIRE_VOLUME", get("JUICECACHE_REQUIRE_VOLUME")),
        read_only=_flag("JUICECACHE_READ_ONLY", get("JUICECACHE_READ_ONLY")),
        background_server=_flag("JUICECACHE_BACKGROUND_SERVER", get("JUICECACHE_BACKGROUND_SERVER")),
        demo_seconds=_positive_float("JUICECACHE_DEMO_SECONDS", get("JUICECACHE_DEMO_SECONDS")),
        prefect_home=path("PREFECT_HOME"),
        prefect_api_url=os.environ.get("PREFECT_API_URL", "").strip(),
        ui_host=get("PREFECT_UI_HOST"),
        ui_port=int(_positive_float("PREFECT_UI_PORT", get("PREFECT_UI_PORT"))),
        access_key=os.environ.get("JFS_ACCESS_KEY", ""),
        secret_key=os.environ.get("JFS_SECRET_KEY", ""),
        meta_password=os.environ.get("META_PASSWORD", ""),
        signing_key=os.environ.get("JUICECACHE_SIGNING_KEY", ""),
    )


def apply_prefect_settings(settings: Settings) -> None:
    """Set the Prefect settings juicecache relies on, unless the user already set them.

    Must run before `prefect` is imported: Prefect reads its settings at import time.
    """
    os.environ.setdefault("PREFECT_HOME", str(settings.prefect_home))
    # Prefect creates its home without parents; ours sits in a folder that may not exist yet.
    Path(os.environ["PREFECT_HOME"]).expanduser().mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", DEFAULTS["PREFECT_SERVER_ANALYTICS_ENABLED"])
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", DEFAULTS["PREFECT_LOGGING_LEVEL"])
    # Prefect's v2 UI contacts amplitude.com from the browser even with analytics off; the
    # v1 UI talks to nothing but its server.
    os.environ.setdefault("PREFECT_SERVER_UI_V2_ENABLED", DEFAULTS["PREFECT_SERVER_UI_V2_ENABLED"])
    # The temporary server Prefect starts when none is running can be slow on a busy machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    if settings.prefect_api_url:
        os.environ["PREFECT_API_URL"] = settings.prefect_api_url


def _resolve(root: Path, path: Path) -> Path:
    return path if path.is_absolute() else (root / path).resolve()


def _resolve_meta_url(root: Path, url: str) -> str:
    """`sqlite3://relative.db` is made absolute, so every process finds the same database."""
    if "://" not in url:
        raise SettingsError(f"JFS_META_URL: {mask_url(url)!r} is not a URL (e.g. redis://host:6379/1)")
    scheme, rest = url.split("://", 1)
    if scheme == "sqlite3" and not rest.startswith("/"):
        db, _, query = rest.partition("?")
        rest = str(_resolve(root, Path(db))) + (f"?{query}" if query else "")
        return f"sqlite3://{rest}"
    return url


def _volume_name(name: str) -> str:
    if not re.fullmatch(r"[a-z0-9][a-z0-9-]{1,61}[a-z0-9]", name):
        raise SettingsError(
            f"JFS_NAME: {name!r} is not a valid volume name (3-63 characters: a-z, 0-9 and '-')"
        )
    return name


def _results_dir(name: str) -> str:
    parts = Path(name).parts
    if Path(name).is_absolute() or ".." in parts or not parts:
        raise SettingsError(f"JUICECACHE_RESULTS_DIR: {name!r} must be a relative folder on the volume")
    return name


def _flag(name: str, text: str) -> bool:
    value = text.lower()
    if value not in ("0", "1", "true", "false", "yes", "no"):
        raise SettingsError(f"{name}: {text!r} is not 0 or 1")
    return value in ("1", "true", "yes")


def _positive_float(name: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1
    if value <= 0:
        raise SettingsError(f"{name}: {text!r} is not a positive number")
    return value
