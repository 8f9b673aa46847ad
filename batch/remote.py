"""Score files against running TorchServe servers over keep-alive HTTP, with retries and timeouts."""

from __future__ import annotations

import http.client
import json
import random
import threading
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import requests

from .errors import ServerUnavailable, UsageError
from .results import Result

RETRY_STATUSES = {503, 507}  # overloaded or out of memory: worth another try; any other 4xx/5xx is final


@dataclass
class RemoteScorer:
    urls: list[str]
    model: str = "fruit"
    token: str | None = None
    concurrency: int = 8
    timeout: float = 60.0
    connect_timeout: float = 5.0
    retries: int = 5
    backoff: float = 0.5
    top_k: int | None = None
    _local: threading.local = field(default_factory=threading.local, repr=False)

    def __post_init__(self) -> None:
        self.urls = [u.rstrip("/") for u in self.urls]
        self.headers = {"Content-Type": "application/octet-stream"}
        if self.token:
            self.headers["Authorization"] = f"Bearer {self.token}"
        if self.top_k:
            self.headers["X-Top-K"] = str(self.top_k)

    def _connection(self, url: str) -> http.client.HTTPConnection:
        """One keep-alive connection per thread and server: ``http.client`` costs far less CPU per request than
        ``requests`` on a machine whose cores the server needs too."""
        connections = getattr(self._local, "connections", None)
        if connections is None:
            connections = self._local.connections = {}
        conn = connections.get(url)
        if conn is None:
            parts = urlsplit(url)
            cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
            conn = connections[url] = cls(parts.hostname, parts.port, timeout=self.timeout)
        return conn

    def _drop(self, url: str) -> None:
        conn = self._local.connections.pop(url, None)
        if conn is not None:
            conn.close()

    def _post(self, url: str, payload: bytes) -> tuple[int, bytes]:
        conn = self._connection(url)
        try:
            conn.request("POST", f"{urlsplit(url).path}/predictions/{self.model}", body=payload,
                         headers=self.headers | {"Content-Length": str(len(payload))})
            response = conn.getresponse()
            body = response.read()
        except (OSError, http.client.HTTPException):
            self._drop(url)
            raise
        if response.getheader("connection", "").lower() == "close":
            self._drop(url)
        return response.status, body

    def check_ready(self) -> None:
        for url in self.urls:
            try:
                response = requests.get(f"{url}/ping", headers=self.headers, timeout=(self.connect_timeout, 10))
            except requests.RequestException as exc:
                raise ServerUnavailable(f"cannot reach {url}: {type(exc).__name__}; is torchserve running?") from None
            if response.status_code in (400, 401, 403) and "token" in response.text.lower():
                raise UsageError(f"{url} rejected the token: pass --token, set FRUIT_TOKEN, or point --key-file at "
                                 "the server's key_file.json")
            if response.status_code != 200:
                raise ServerUnavailable(f"{url}/ping answered {response.status_code}: {response.text.strip()[:200]}")

    def score_one(self, root: Path, rel: Path, attempt_offset: int, stop: threading.Event) -> Result:
        path = rel.as_posix()
        try:
            payload = (root / rel).read_bytes()
        except OSError as exc:
            return Result.failed(path, f"cannot read file: {exc.strerror or exc}")
        last = ""
        for attempt in range(self.retries + 1):
            url = self.urls[(attempt_offset + attempt) % len(self.urls)]
            try:
                status, body = self._post(url, payload)
            except (OSError, http.client.HTTPException) as exc:
                last = f"{url}: {type(exc).__name__}"
            else:
                if status == 200:
                    return Result.ok(path, json.loads(body))
                if status not in RETRY_STATUSES:
                    return Result.failed(path, _error_message(status, body), status)
                last = f"{url}: HTTP {status}"
            pause = min(10.0, self.backoff * 2**attempt) * (0.5 + random.random())
            if attempt < self.retries and stop.wait(pause):
                break  # the run is stopping: leave this file for --resume
        raise ServerUnavailable(f"gave up on {path} after {self.retries + 1} attempts ({last})")

    def score(self, root: Path, paths: list[Path], stop: threading.Event) -> Iterator[Result]:
        """Results in completion order; at most ``concurrency`` files are in flight (and in memory)."""
        self.check_ready()
        todo = iter(enumerate(paths))
        with ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="fruit-batch") as pool:
            running: set[Future] = set()

            def refill() -> None:
                while len(running) < self.concurrency * 2 and not stop.is_set():
                    item = next(todo, None)
                    if item is None:
                        return
                    running.add(pool.submit(self.score_one, root, item[1], item[0], stop))

            refill()
            unavailable: ServerUnavailable | None = None
            try:
                while running:
                    finished, _ = wait(running, timeout=0.5, return_when=FIRST_COMPLETED)
                    for future in finished:
                        running.discard(future)
                        try:
                            yield future.result()
                        except ServerUnavailable as exc:
                            # stop starting new files, but keep what the other requests in flight bring back
                            unavailable = unavailable or exc
                            stop.set()
                    refill()
            finally:
                stop.set()
                for future in running:
                    future.cancel()
            if unavailable is not None:
                raise unavailable


def _error_message(status: int, body: bytes) -> str:
    try:
        parsed = json.loads(body)
    except ValueError:
        return f"HTTP {status}: {body.decode('utf-8', 'replace').strip()[:300]}"
    if not isinstance(parsed, dict):
        return f"HTTP {status}: {str(parsed)[:300]}"
    return str(parsed.get("error") or parsed.get("message") or parsed)
