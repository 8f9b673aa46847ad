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


class _Load:
    """One load run: ``total`` requests over a fixed set of connections, driven by one selector."""

    def __init__(self, address: tuple[str, int], requests: list[bytes], total: int, timeout: float) -> None:
        self.address, self.requests, self.total, self.timeout = address, requests, total, timeout
        self.selector = selectors.DefaultSelector()
        self.latencies: list[float] = []
        self.statuses: dict[int, int] = {}
        self.by_status: dict[int, list[float]] = {}
        self.sent = self.done = 0

    def record(self, status: int, started: float) -> None:
        elapsed = (time.perf_counter() - started) * 1000
        self.latencies.append(elapsed)
        self.statuses[status] = self.statuses.get(status, 0) + 1
        self.by_status.setdefault(status, []).append(elapsed)
        self.done += 1

    def send_next(self, conn: _Connection) -> None:
        """Start the next request on ``conn`` (reopened if needed); a request that cannot be sent fails."""
        while self.sent < self.total:
            conn.started = time.perf_counter()
            request = self.requests[self.sent % len(self.requests)]
            self.sent += 1
            try:
                if conn.sock is None:
                    conn.open(self.selector)
                conn.buffer.clear()
                try:  # most requests fit the socket buffer: no wait for writability
                    conn.out = memoryview(request)[conn.sock.send(request):]
                except BlockingIOError:
                    conn.out = memoryview(request)
                conn.watch(self.selector, selectors.EVENT_WRITE if conn.out else selectors.EVENT_READ)
                return
            except OSError:
                conn.close(self.selector)
                self.record(FAILED, conn.started)
        conn.close(self.selector)

    def fail(self, conn: _Connection) -> None:
        conn.close(self.selector)
        self.record(FAILED, conn.started)
        self.send_next(conn)

    def on_event(self, conn: _Connection, events: int) -> None:
        """Write more of the request, or read the answer and send the next request once it is whole."""
        try:
            if events & selectors.EVENT_WRITE:
                conn.out = conn.out[conn.sock.send(conn.out):]
                if not conn.out:
                    conn.watch(self.selector, selectors.EVENT_READ)
                return
            chunk = conn.sock.recv(65536)
            if not chunk:
                raise ConnectionResetError("server closed the connection")
            conn.buffer += chunk
            status = conn.response()
        except BlockingIOError:
            return
        except (OSError, ValueError, IndexError):
            self.fail(conn)
            return
        if status is not None:
            self.record(status, conn.started)
            if conn.close_after:
                conn.close(self.selector)
            self.send_next(conn)

    def expire(self, now: float) -> None:
        """Fail the requests that have waited longer than the timeout."""
        for key in list(self.selector.get_map().values()):
            if now - key.data.started > self.timeout:
                self.fail(key.data)

    def run(self, concurrency: int) -> float:
        """Wall seconds until every request has an outcome."""
        wall0 = last_check = time.perf_counter()
        for conn in [_Connection(self.address) for _ in range(min(concurrency, self.total))]:
            self.send_next(conn)
        while self.done < self.total:
            for key, events in self.selector.select(timeout=0.1):
                self.on_event(key.data, events)
            now = time.perf_counter()
            if now - last_check > 0.1:
                last_check = now
                self.expire(now)
        self.selector.close()
        return time.perf_counter() - wall0


def run_load(url: str, path: str, payloads: list[bytes], concurrency: int, total: int, headers: dict[str, str],
             timeout: float = 60.0) -> LoadResult:
    """Send ``total`` POSTs (cycling through ``payloads``) over ``concurrency`` keep-alive connections.

    A request with no complete answer within ``timeout`` seconds counts as failed (status -1), as does
    a connection error; its connection is reopened for the next request.
    """
    parts = urlsplit(url)
    load = _Load((parts.hostname or "127.0.0.1", parts.port or 80), encode_requests(parts.netloc, path, payloads,
                                                                                     headers), total, timeout)
    cpu0 = time.process_time()
    wall = load.run(concurrency)
    return LoadResult(concurrency, total, wall, load.statuses, load.latencies, time.process_time() - cpu0,
                      load.by_status)
