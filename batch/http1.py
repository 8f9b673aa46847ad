"""A small asyncio HTTP/1.1 client: keep-alive connections, one request in flight on each.

``fruit-batch`` shares the machine's cores with the server it calls. With one ``http.client``
connection per thread (32 threads waking up for every batch of answers, each parsing headers with
the GIL held) it got about 0.8 of what the server can serve on two cores; one event loop with a
connection per request in flight gets about 0.9 (BENCHMARKS.md, Batch scoring). It speaks what
TorchServe and KServe answer with: ``Content-Length`` or chunked bodies, keep-alive or
``Connection: close``, HTTP/1.0 or 1.1, plain or TLS.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass
from urllib.parse import urlsplit

MAX_HEADER_BYTES = 64 * 1024


class ProtocolError(ValueError):
    """The server's answer is not HTTP/1.x as this client reads it."""


@dataclass
class Response:
    status: int
    headers: dict[str, str]  # lower-case names; a repeated header keeps its last value
    body: bytes


class Connection:
    """One keep-alive connection to ``url`` (scheme, host and port; its path is ignored)."""

    def __init__(self, url: str, connect_timeout: float, ssl_context: ssl.SSLContext | None = None) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.ssl = (ssl_context or ssl.create_default_context()) if parts.scheme == "https" else None
        self.connect_timeout = connect_timeout
        host = f"[{self.host}]" if ":" in self.host else self.host  # an IPv6 address keeps its brackets
        self.host_header = host if parts.port is None else f"{host}:{parts.port}"
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str, headers: dict[str, str], body: bytes = b"") -> Response:
        """Send one request and read its whole answer. On any error the connection is closed (the next request
        opens a new one), so a half-read answer can never be taken for the next one's."""
        if self._reader is not None and (self._reader.at_eof() or self._writer.is_closing()):
            self.close()  # the server closed it while it was idle (a keep-alive timeout): not worth a retry
        try:
            if self._writer is None:
                self._reader, self._writer = await asyncio.wait_for(
                    asyncio.open_connection(self.host, self.port, ssl=self.ssl, limit=MAX_HEADER_BYTES),
                    self.connect_timeout)
            self._writer.write(encode_head(method, path, self.host_header, headers, len(body)) + body)
            await self._writer.drain()
            response, keep_alive = await self._read_response()
        except BaseException:
            self.close()
            raise
        if not keep_alive:
            self.close()
        return response

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None

    async def _read_response(self) -> tuple[Response, bool]:
        assert self._reader is not None
        while True:
            try:
                head = await self._reader.readuntil(b"\r\n\r\n")
            except asyncio.LimitOverrunError:
                raise ProtocolError(f"answer headers longer than {MAX_HEADER_BYTES} bytes") from None
            version, status, headers = parse_head(head)
            if not 100 <= status < 200:  # an interim answer (100 Continue) is followed by the real one
                break
        keep_alive = keeps_alive(version, headers)
        if status in (204, 304):  # never a body, whatever the headers say
            body = b""
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            body = await self._read_chunked()
        elif "content-length" in headers:
            try:
                length = int(headers["content-length"])
            except ValueError:
                raise ProtocolError(f"bad Content-Length {headers['content-length']!r}") from None
            body = await self._reader.readexactly(length)
        else:  # the body runs to the end of the connection
            body, keep_alive = await self._reader.read(), False
        return Response(status, headers, body), keep_alive

    async def _read_chunked(self) -> bytes:
        assert self._reader is not None
        parts = []
        while True:
            line = await self._reader.readuntil(b"\r\n")
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise ProtocolError(f"bad chunk size line {line[:40]!r}") from None
            if size == 0:
                while (await self._reader.readuntil(b"\r\n")) != b"\r\n":  # trailers, then the blank line
                    pass
                return b"".join(parts)
            parts.append(await self._reader.readexactly(size))
            if await self._reader.readexactly(2) != b"\r\n":
                raise ProtocolError("chunk not followed by CRLF")


def request_once(url: str, method: str, path: str, headers: dict[str, str], body: bytes = b"", *,
                 timeout: float = 10.0, connect_timeout: float = 5.0) -> Response:
    """One request on a connection of its own, from synchronous code (a readiness check)."""
    async def send() -> Response:
        conn = Connection(url, connect_timeout)
        try:
            async with asyncio.timeout(timeout):
                return await conn.request(method, path, headers, body)
        finally:
            conn.close()

    return asyncio.run(send())


def encode_head(method: str, path: str, host: str, headers: dict[str, str], length: int) -> bytes:
    """The request line and headers of a request with a ``length``-byte body (``headers`` may set Host)."""
    names = {k.lower() for k in headers}
    lines = [f"{method} {path} HTTP/1.1"]
    if "host" not in names:
        lines.append(f"Host: {host}")
    lines += [f"{k}: {v}" for k, v in headers.items() if k.lower() != "content-length"]
    lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def keeps_alive(version: str, headers: dict[str, str]) -> bool:
    """Whether the connection stays open after this answer: HTTP/1.1 unless it says close, HTTP/1.0 if it
    asks for keep-alive."""
    connection = headers.get("connection", "").lower()
    return connection != "close" and (version != "HTTP/1.0" or connection == "keep-alive")


def parse_head(head: bytes) -> tuple[str, int, dict[str, str]]:
    """Version, status and headers (lower-case names) of an answer's head."""
    lines = head.decode("latin-1").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    code = rest[:3]
    if not version.startswith("HTTP/1.") or not code.isdigit():
        raise ProtocolError(f"not an HTTP/1.x status line: {lines[0][:80]!r}")
    headers = {}
    for line in lines[1:]:
        if line:
            name, sep, value = line.partition(":")
            if not sep:
                raise ProtocolError(f"bad header line {line[:80]!r}")
            name, value = name.strip().lower(), value.strip()
            if name == "content-length" and headers.get(name, value) != value:
                # two lengths: which one frames the body is a guess, and a wrong guess shifts every later answer
                raise ProtocolError("conflicting Content-Length headers")
            headers[name] = value
    return version, int(code), headers
