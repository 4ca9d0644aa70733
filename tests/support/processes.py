"""Ports, waiting and stopping: what every test and the benchmark need around the processes they start.

Standard library only, so the benchmark (`python -m bench`) imports it without pytest or juicecache.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import time
from collections.abc import Callable

# Linux hands out ports from 32768 up when a program binds port 0; consecutive ports are
# picked below that, so a server started meanwhile on a kernel-chosen port never takes one.
_BELOW_EPHEMERAL = (20000, 32000)


def free_port() -> int:
    """A loopback port nobody listens on now, chosen by the kernel."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_ports(count: int, host: str = "127.0.0.1") -> int:
    """The first of `count` consecutive free ports on `host`, for services that take a base port and the next ones."""
    low, high = _BELOW_EPHEMERAL
    for _ in range(200):
        base = random.randrange(low, high - count)
        if all(_port_free(host, port) for port in range(base, base + count)):
            return base
    raise RuntimeError(f"no {count} consecutive free ports on {host}")


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: TIME_WAIT is no conflict
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def wait_until(predicate: Callable[[], object], timeout: float, interval: float = 0.2) -> bool:
    """Poll `predicate` until it is true or `timeout` seconds passed; whether it became true."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def stop_group(process: subprocess.Popen, patience: float = 20) -> None:
    """Stop a process started with start_new_session=True, and whatever it started in its group.

    SIGTERM first, so a server shuts down its own children; SIGKILL after `patience` seconds.
    Once the leader is gone, anything left in its group is killed too. A process that already
    ended is no error: teardown calls this whatever state the test left things in.
    """
    for sig, wait in ((signal.SIGTERM, patience), (signal.SIGKILL, 30)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            pass
        try:
            process.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
