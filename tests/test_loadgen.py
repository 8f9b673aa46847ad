"""bench/loadgen.py against a small local HTTP server: every request answered and counted once."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
from conftest import local_http_server

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from loadgen import FAILED, run_load  # noqa: E402


class Echo(BaseHTTPRequestHandler):
    """200 for a body that starts with "ok" (keep-alive), 415 and a closed connection otherwise, as TorchServe does."""

    protocol_version = "HTTP/1.1"
    seen: list[bytes] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Echo.seen.append(body)
        ok = body.startswith(b"ok") and self.headers["Authorization"] == "Bearer t"
        answer = b'{"label": "x"}' if ok else b'{"error": "no"}'
        self.send_response(200 if ok else 415)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        if not ok:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[str]:
    Echo.seen = []
    with local_http_server(Echo) as url:
        yield url


def test_every_request_is_sent_and_counted_once(server: str):
    payloads = [b"ok-a", b"bad", b"ok-b" * 20_000]  # the last one is larger than one socket write
    result = run_load(server, "/predictions/fruit", payloads, concurrency=4, total=30,
                      headers={"Authorization": "Bearer t"}, timeout=10)
    assert result.statuses == {200: 20, 415: 10}
    assert len(result.latencies_ms) == 30 and sorted(Echo.seen) == sorted(payloads * 10)
    assert result.row()["errors"] == 10 and 0 < result.client_cpu_share <= 1


def test_refused_connection_counts_as_failed():
    result = run_load("http://127.0.0.1:9", "/x", [b"ok"], concurrency=2, total=5, headers={}, timeout=5)
    assert result.statuses == {FAILED: 5}
