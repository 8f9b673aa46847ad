"""A cheap HTTP/1.1 load generator: one thread, non-blocking keep-alive sockets, requests encoded up front.

It shares the 2 cores with the server it measures, so every microsecond it spends is taken from the
server: there is no ``http.client`` (its header parsing cost about 0.11 ms of CPU per request here, a
third of the frontend's share; the request and answer heads are ``fruit-batch``'s own codec,
``fruitserve.batch.http1``), no thread per connection and no GIL hand-offs. Each connection sends
its next request when the previous answer is complete; a connection the server closes (TorchServe
closes after a 4xx) is reopened. Reports throughput, latency percentiles, status counts and the
generator's own CPU share.
"""

from __future__ import annotations

import os
import selectors
import socket
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from fruitserve.batch.http1 import encode_head, keeps_alive, parse_head

FAILED = -1  # status recorded for a connection error or a timeout


@dataclass
class LoadResult:
    concurrency: int
    requests: int
    seconds: float
    statuses: dict[int, int]
    latencies_ms: list[float]
    client_cpu_seconds: float  # the generator's own CPU time (user + system) over the run
    latencies_by_status: dict[int, list[float]] = field(default_factory=dict)

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds

    @property
    def client_cpu_share(self) -> float:
        """Of the whole machine (all cores)."""
        return self.client_cpu_seconds / self.seconds / (os.cpu_count() or 1)

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]

    def row(self) -> dict:
        return {"concurrency": self.concurrency, "requests": self.requests, "img_per_s": round(self.throughput, 1),
                "p50_ms": round(self.percentile(50), 1), "p99_ms": round(self.percentile(99), 1),
                "errors": sum(n for s, n in self.statuses.items() if s != 200),
                "client_cpu_share": round(self.client_cpu_share, 3)}


def encode_requests(host: str, path: str, payloads: list[bytes], headers: dict[str, str]) -> list[bytes]:
    return [encode_head("POST", path, host, headers, len(body)) + body for body in payloads]


class _Connection:
    """One keep-alive connection with at most one request in flight."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.address = address
        self.sock: socket.socket | None = None
        self.out = memoryview(b"")
        self.buffer = bytearray()
        self.started = 0.0
        self.close_after = False
        self.events = selectors.EVENT_WRITE

    def watch(self, selector: selectors.BaseSelector, events: int) -> None:
        if events != self.events:
            selector.modify(self.sock, events, self)
            self.events = events

    def open(self, selector: selectors.BaseSelector) -> None:
        self.sock = socket.create_connection(self.address, timeout=10)
        self.sock.setblocking(False)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        selector.register(self.sock, selectors.EVENT_WRITE, self)
        self.events = selectors.EVENT_WRITE

    def close(self, selector: selectors.BaseSelector) -> None:
        if self.sock is not None:
            selector.unregister(self.sock)
            self.sock.close()
            self.sock = None

    def response(self) -> int | None:
        """The status of a complete response in the buffer (consumed), or None while it is incomplete."""
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return None
        version, status, headers = parse_head(bytes(self.buffer[:end]))
        if "transfer-encoding" in headers:
            raise ValueError("chunked responses are not expected from /predictions")
        length = int(headers.get("content-length", 0))
        if len(self.buffer) < end + 4 + length:
            return None
        del self.buffer[:end + 4 + length]
        self.close_after = not keeps_alive(version, headers)
        return status


def run_load(url: str, path: str, payloads: list[bytes], concurrency: int, total: int, headers: dict[str, str],
             timeout: float = 60.0) -> LoadResult:
    """Send ``total`` POSTs (cycling through ``payloads``) over ``concurrency`` keep-alive connections.

    A request with no complete answer within ``timeout`` seconds counts as failed (status -1), as does
    a connection error; its connection is reopened for the next request.
    """
    parts = urlsplit(url)
    address = (parts.hostname or "127.0.0.1", parts.port or 80)
    requests = encode_requests(parts.netloc, path, payloads, headers)
    selector = selectors.DefaultSelector()
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    by_status: dict[int, list[float]] = {}
    sent = 0
    done = 0

    def record(status: int, started: float) -> None:
        nonlocal done
        elapsed = (time.perf_counter() - started) * 1000
        latencies.append(elapsed)
        statuses[status] = statuses.get(status, 0) + 1
        by_status.setdefault(status, []).append(elapsed)
        done += 1

    def send_next(conn: _Connection) -> None:
        """Start the next request on ``conn`` (reopened if needed); a request that cannot be sent fails."""
        nonlocal sent
        while sent < total:
            conn.started = time.perf_counter()
            request = requests[sent % len(requests)]
            sent += 1
            try:
                if conn.sock is None:
                    conn.open(selector)
                conn.buffer.clear()
                try:  # most requests fit the socket buffer: no wait for writability
                    conn.out = memoryview(request)[conn.sock.send(request):]
                except BlockingIOError:
                    conn.out = memoryview(request)
                conn.watch(selector, selectors.EVENT_WRITE if conn.out else selectors.EVENT_READ)
                return
            except OSError:
                conn.close(selector)
                record(FAILED, conn.started)
        conn.close(selector)

    def fail(conn: _Connection) -> None:
        conn.close(selector)
        record(FAILED, conn.started)
        send_next(conn)

    cpu0, wall0 = time.process_time(), time.perf_counter()
    last_check = wall0
    for conn in [_Connection(address) for _ in range(min(concurrency, total))]:
        send_next(conn)
    while done < total:
        for key, events in selector.select(timeout=0.1):
            conn: _Connection = key.data
            try:
                if events & selectors.EVENT_WRITE:
                    conn.out = conn.out[conn.sock.send(conn.out):]
                    if not conn.out:
                        conn.watch(selector, selectors.EVENT_READ)
                    continue
                chunk = conn.sock.recv(65536)
                if not chunk:
                    raise ConnectionResetError("server closed the connection")
                conn.buffer += chunk
                status = conn.response()
            except BlockingIOError:
                continue
            except (OSError, ValueError, IndexError):
                fail(conn)
                continue
            if status is not None:
                record(status, conn.started)
                if conn.close_after:
                    conn.close(selector)
                send_next(conn)
        now = time.perf_counter()
        if now - last_check > 0.1:
            last_check = now
            for key in list(selector.get_map().values()):
                if now - key.data.started > timeout:
                    fail(key.data)
    selector.close()
    wall = time.perf_counter() - wall0
    cpu = time.process_time() - cpu0
    return LoadResult(concurrency, total, wall, statuses, latencies, cpu, by_status)
