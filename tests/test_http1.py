"""fruit-batch's asyncio HTTP/1.1 client against small local servers: the answer shapes TorchServe, KServe and
proxies send, broken answers, TLS, and a run interrupted while its requests wait on a slow server."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import jpeg_bytes, local_http_server, read_csv, start_fruit_batch, wait_for_rows
from fruitserve.batch.cli import main as batch_main
from fruitserve.batch.http1 import Connection, ProtocolError
from fruitserve.batch.remote import RemoteScorer

PREDICTION = b'{"label": "Lime", "confidence": 0.9, "top_k": [{"label": "Lime", "probability": 0.9}]}'


class Shapes(BaseHTTPRequestHandler):
    """The path picks the shape of the answer; every answer echoes the request body after ``echo:``."""

    protocol_version = "HTTP/1.1"
    peers: list[int] = []  # the client port of each request: one per connection
    delay = 0.0

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        Shapes.peers.append(self.client_address[1])
        body = b"echo:" + self.rfile.read(int(self.headers["Content-Length"]))
        time.sleep(Shapes.delay)
        shape = self.path.rsplit("/", 1)[-1]
        if shape == "garbage":
            self.wfile.write(b"SSH-2.0-OpenSSH\r\n\r\n")
            self.close_connection = True
            return
        if shape == "interim":
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if shape == "http10":
            self.wfile.write(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            self.close_connection = True
            return
        if shape == "not-modified":  # 304 never has a body, even with a Content-Length
            self.wfile.write(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n")
            return
        self.send_response(200)
        self.answer_200(shape, body)

    def answer_200(self, shape: str, body: bytes) -> None:
        """The rest of a 200 answer, framed the way ``shape`` says."""
        if shape == "chunked":
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for part in (body[:3], body[3:]):
                self.wfile.write(b"%x;ext=1\r\n%s\r\n" % (len(part), part))
            self.wfile.write(b"0\r\nX-Trailer: yes\r\n\r\n")
        elif shape == "close":  # no length: the body ends with the connection
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)
            self.close_connection = True
        elif shape == "close-length":  # what TorchServe does after a 4xx
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)
            self.close_connection = True
        elif shape == "idle-close":  # a keep-alive answer, then the server drops the idle connection
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            self.close_connection = True
        elif shape == "two-lengths":
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(body)
        elif shape == "short":  # promises more than it sends, then hangs up
            self.send_header("Content-Length", str(len(body) + 100))
            self.end_headers()
            self.wfile.write(body)
            self.close_connection = True
        elif shape == "predictions":
            self.send_header("Content-Length", str(len(PREDICTION)))
            self.end_headers()
            self.wfile.write(PREDICTION)
        else:
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 - fruit-batch's readiness check (/ping)
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def serve(tls: ssl.SSLContext | None = None) -> Iterator[str]:
    Shapes.peers, Shapes.delay = [], 0.0
    with local_http_server(Shapes, tls) as url:
        yield url


@pytest.fixture
def server() -> Iterator[str]:
    with serve() as url:
        yield url


def exchange(url: str, paths: list[str], body: bytes = b"abc", ssl_context: ssl.SSLContext | None = None
             ) -> tuple[list[object], Connection]:
    """POST ``body`` to each path in turn over one Connection; an exception is that request's result."""
    conn = Connection(url, connect_timeout=5, ssl_context=ssl_context)

    async def run() -> list[object]:
        results: list[object] = []
        for path in paths:
            try:
                async with asyncio.timeout(10):
                    results.append(await conn.request("POST", path, {"Content-Type": "text/plain"}, body))
            except Exception as exc:  # noqa: BLE001 - the test looks at which one
                results.append(exc)
        conn.close()
        return results

    return asyncio.run(run()), conn


def test_every_answer_shape_is_read_whole(server: str):
    shapes = ["length", "chunked", "close", "http10", "interim", "length"]
    results, _ = exchange(server, [f"/x/{s}" for s in shapes], body=b"fruit" * 10_000)
    for shape, response in zip(shapes, results, strict=True):
        assert not isinstance(response, Exception), (shape, response)
        assert response.status == 200 and response.body == b"echo:" + b"fruit" * 10_000, shape
    assert results[1].headers["transfer-encoding"] == "chunked"


def test_keep_alive_reuses_the_connection_until_the_server_closes_it(server: str):
    paths = ["/length", "/length", "/chunked", "/close-length", "/length", "/http10", "/length", "/close", "/length"]
    results, _ = exchange(server, paths)
    assert [r.status for r in results] == [200] * len(paths)
    peers = Shapes.peers
    # a new connection after each answer that closes it (Connection: close with or without a length, HTTP/1.0)
    assert [len(set(peers[a:b])) for a, b in ((0, 4), (4, 6), (6, 8), (8, 9))] == [1, 1, 1, 1]
    assert len(set(peers)) == 4


def test_a_connection_the_server_dropped_while_idle_is_reopened_not_failed(server: str):
    conn = Connection(server, connect_timeout=5)

    async def run() -> list[bytes]:
        first = await conn.request("POST", "/idle-close", {}, b"a")
        await asyncio.sleep(0.3)  # the server closes the connection meanwhile
        second = await conn.request("POST", "/length", {}, b"b")
        conn.close()
        return [first.body, second.body]

    assert asyncio.run(run()) == [b"echo:a", b"echo:b"]
    assert len(set(Shapes.peers)) == 2


def test_no_body_is_read_for_a_304_and_two_lengths_are_refused(server: str):
    results, _ = exchange(server, ["/not-modified", "/length", "/two-lengths", "/length"])
    assert results[0].status == 304 and results[0].body == b""
    assert results[1].body == b"echo:abc"  # nothing of the 304 was left to be read as this answer
    assert isinstance(results[2], ProtocolError) and "Content-Length" in str(results[2])
    assert results[3].body == b"echo:abc"


def test_an_ipv6_address_keeps_its_brackets_in_the_host_header():
    assert Connection("http://[::1]:8080", connect_timeout=1).host_header == "[::1]:8080"
    assert Connection("https://example.org", connect_timeout=1).host_header == "example.org"


def test_a_broken_answer_fails_that_request_only(server: str):
    results, _ = exchange(server, ["/short", "/length", "/garbage", "/length"])
    assert isinstance(results[0], asyncio.IncompleteReadError)
    assert isinstance(results[2], ProtocolError) and "not an HTTP/1.x status line" in str(results[2])
    assert results[1].body == results[3].body == b"echo:abc"


def test_a_refused_connection_is_an_os_error():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    results, _ = exchange(f"http://127.0.0.1:{port}", ["/length"])
    assert isinstance(results[0], OSError)


@pytest.fixture
def certificate(tmp_path: Path) -> Path:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make a test certificate")
    cert = tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(tmp_path / "key.pem"), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    return cert


def test_tls_is_verified_and_spoken(certificate: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    server_side = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_side.load_cert_chain(certificate, tmp_path / "key.pem")
    with serve(server_side) as url:
        untrusted, _ = exchange(url, ["/length"])
        assert isinstance(untrusted[0], ssl.SSLCertVerificationError)
        trusting = ssl.create_default_context(cafile=str(certificate))
        results, _ = exchange(url, ["/length", "/chunked"], ssl_context=trusting)
        assert [r.body for r in results] == [b"echo:abc"] * 2 and len(set(Shapes.peers)) == 1
        # fruit-batch --url https://...: the system's trust store (here: SSL_CERT_FILE) decides
        monkeypatch.setenv("SSL_CERT_FILE", str(certificate))
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(certificate))
        folder = tmp_path / "in"
        folder.mkdir()
        (folder / "a.jpg").write_bytes(jpeg_bytes())
        result = CliRunner().invoke(batch_main, ["score", str(folder), str(tmp_path / "out.csv"), "--quiet",
                                                 "--url", url, "--model", "predictions",
                                                 "--key-file", str(tmp_path / "none.json")])
        assert result.exit_code == 0, result.output
        assert read_csv(tmp_path / "out.csv")[0]["label"] == "Lime"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupt_ends_the_run_at_once_and_keeps_whole_rows(server: str, tmp_path: Path, sig: signal.Signals):
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(200):
        (folder / f"{i:03d}.jpg").write_bytes(jpeg_bytes(seed=i))
    out = tmp_path / "out.csv"
    process = start_fruit_batch(str(folder), str(out), "--quiet", "--url", server, "--model", "predictions",
                                "--concurrency", "4", "--timeout", "300", "--key-file", str(tmp_path / "none.json"))
    try:
        wait_for_rows(out, 8, process)
        Shapes.delay = 120  # from now on the server holds every answer: the interrupt lands while requests wait
        time.sleep(0.5)
        process.send_signal(sig)
        # the run ends without waiting for the answers in flight (--resume scores those files again)
        _, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 130, err
    assert "Rerun with --resume" in err and "Traceback" not in err
    rows = read_csv(out)
    assert 8 <= len(rows) < 200 and all(r["status"] == "ok" and r["label"] == "Lime" for r in rows)


@pytest.mark.parametrize("method", ["_result", "_job"])
def test_a_bug_ends_the_run_at_once(server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str):
    # _result (parsing an answer) and _job (reading a file) run in one lane, which on its own would end and leave the
    # others going
    original = getattr(RemoteScorer, method)
    calls = []

    def broken(self: RemoteScorer, *args: object) -> object:
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError(f"bug in {method}")
        return original(self, *args)

    monkeypatch.setattr(RemoteScorer, method, broken)
    Shapes.delay = 0.01  # 200 files two at a time take at least 1 s
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(200):
        (folder / f"{i:03d}.jpg").write_bytes(jpeg_bytes(seed=i))
    result = CliRunner().invoke(batch_main, ["score", str(folder), str(tmp_path / "out.csv"), "--quiet", "--url", server,
                                             "--model", "predictions", "--concurrency", "2",
                                             "--key-file", str(tmp_path / "none.json")])
    assert isinstance(result.exception, RuntimeError) and f"bug in {method}" in str(result.exception)
    assert len(Shapes.peers) < 100, "the run went on after the bug"
