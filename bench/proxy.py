"""A TCP proxy that adds a fixed one-way delay to every byte, both ways: emulated network latency.

The cloud-like profile needs S3 and Redis to sit behind a real round-trip time. Linux
`tc qdisc ... netem` is the usual tool, but this machine's kernel has no sch_netem, so
this proxy stands in for it: each chunk read from one side is written to the other side
`delay` seconds after it arrived, in order. Like netem's delay, every request/response
exchange then costs one round trip (2 x delay) more, and a new connection costs one
more round trip before its first byte arrives (the TCP handshake netem would delay).
Unlike netem it does not limit bandwidth or drop packets; neither does the profile ask
for that. No library offers such a proxy, hence these few lines.

Threads, not asyncio: an event loop sleeps in whole milliseconds (epoll), which would turn
Redis's 0.5 ms into 1-2 ms each way; `time.sleep` keeps sub-millisecond delays. Each
direction of a connection has a reader (stamps chunks as they arrive) and a writer
(delivers each one when due), so a stream is delayed, not slowed down.

    python -m bench.proxy LISTEN_PORT:TARGET_PORT:DELAY_MS [...]   (all on 127.0.0.1)
"""

from __future__ import annotations

import contextlib
import queue
import signal
import socket
import sys
import threading
import time

HOST = "127.0.0.1"
CHUNK = 1 << 20


def _pump(source: socket.socket, sink: socket.socket, delay: float, not_before: float) -> None:
    """Copy source -> sink, each chunk delivered `delay` after it arrived (never before `not_before`)."""
    pending: queue.SimpleQueue[tuple[float, bytes]] = queue.SimpleQueue()

    def deliver() -> None:
        with contextlib.suppress(OSError):
            while True:
                due, data = pending.get()
                if not data:
                    sink.shutdown(socket.SHUT_WR)
                    return
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                sink.sendall(data)

    writer = threading.Thread(target=deliver, daemon=True)
    writer.start()
    data = b""
    with contextlib.suppress(OSError):
        while data := source.recv(CHUNK):
            pending.put((max(time.monotonic() + delay, not_before), data))
    pending.put((0.0, b""))
    writer.join()


def _connection(client: socket.socket, target: int, delay: float) -> None:
    handshake_done = time.monotonic() + 2 * delay  # SYN / SYN-ACK would have cost one round trip
    try:
        server = socket.create_connection((HOST, target))
    except OSError:
        client.close()
        return
    for sock in (client, server):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # no Nagle on top of the delay
    upstream = threading.Thread(target=_pump, args=(client, server, delay, handshake_done + delay), daemon=True)
    upstream.start()
    _pump(server, client, delay, handshake_done)
    upstream.join()
    client.close()
    server.close()


def _serve(listener: socket.socket, target: int, delay: float) -> None:
    while True:
        client, _ = listener.accept()
        threading.Thread(target=_connection, args=(client, target, delay), daemon=True).start()


def parse(route: str) -> tuple[int, int, float]:
    listen, target, delay_ms = route.split(":")
    return int(listen), int(target), float(delay_ms) / 1000


def main(routes: list[tuple[int, int, float]]) -> None:
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    for listen, target, delay in routes:
        listener = socket.create_server((HOST, listen))
        threading.Thread(target=_serve, args=(listener, target, delay), daemon=True).start()
    print("ready", flush=True)
    stop.wait()


if __name__ == "__main__":
    main([parse(route) for route in sys.argv[1:]])
