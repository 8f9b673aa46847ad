"""Score files against running TorchServe servers over keep-alive HTTP, with retries and timeouts.

``protocol`` picks the request format and path: ``torchserve`` posts the raw file to
``/predictions/{model}``; ``kserve-v1`` posts ``{"instances": [{"data": "<base64>"}]}`` to
``/v1/models/{model}:predict``; ``kserve-v2`` posts a BYTES input to ``/v2/models/{model}/infer``.
The KServe paths are the same on a KServe InferenceService and on TorchServe itself (its
frontend routes them to the model), so ``--url`` is always just the base address.
"""

from __future__ import annotations

import base64
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

# Worth another try: overloaded (503), and a worker that died mid-batch (507 "Worker died.", or 500 when the kill
# lands while the answer is being sent: both seen in RELIABILITY.md's kill runs). Any other 4xx/5xx is final,
# and a 500 that stays is the file's own error row.
RETRY_STATUSES = {500, 503, 507}
# KServe's wrapper answers 500 for whatever TorchServe refused (overload included) and its ingress 502/504 while
# a pod starts or is replaced.
KSERVE_RETRY_STATUSES = RETRY_STATUSES | {502, 504}
PROTOCOLS = ("torchserve", "kserve-v1", "kserve-v2")


class BadAnswer(ValueError):
    """A 200 answer that does not hold one prediction in the protocol's shape."""


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
    protocol: str = "torchserve"
    host_header: str | None = None
    _local: threading.local = field(default_factory=threading.local, repr=False)

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise UsageError(f"unknown protocol {self.protocol!r}: choose one of {', '.join(PROTOCOLS)}")
        self.urls = [u.rstrip("/") for u in self.urls]
        content_type = "application/octet-stream" if self.protocol == "torchserve" else "application/json"
        self.headers = {"Content-Type": content_type}
        if self.token:
            self.headers["Authorization"] = f"Bearer {self.token}"
        if self.top_k:
            self.headers["X-Top-K"] = str(self.top_k)
        if self.host_header:  # KServe's ingress routes on the Host header (the InferenceService's hostname)
            self.headers["Host"] = self.host_header
        self.retry_statuses = RETRY_STATUSES if self.protocol == "torchserve" else KSERVE_RETRY_STATUSES

    @property
    def path(self) -> str:
        return {"torchserve": f"/predictions/{self.model}", "kserve-v1": f"/v1/models/{self.model}:predict",
                "kserve-v2": f"/v2/models/{self.model}/infer"}[self.protocol]

    def encode(self, image: bytes) -> bytes:
        """The request body for one image."""
        if self.protocol == "torchserve":
            return image
        data = base64.b64encode(image).decode("ascii")
        if self.protocol == "kserve-v1":
            instance: dict = {"data": data}
            if self.top_k:
                instance["top_k"] = self.top_k
            return json.dumps({"instances": [instance]}).encode()
        request: dict = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [data]}]}
        if self.top_k:
            request["parameters"] = {"top_k": self.top_k}
        return json.dumps(request).encode()

    def decode(self, body: bytes) -> dict:
        """The one prediction (or per-image error) in a 200 answer."""
        try:
            answer = json.loads(body)
            if self.protocol == "kserve-v1":
                answer = _single(answer["predictions"])
            elif self.protocol == "kserve-v2":
                answer = _single(_single(answer["outputs"])["data"])
            if isinstance(answer, str):  # v2 BYTES, and TorchServe's own envelopes, carry the JSON as a string
                answer = json.loads(answer)
        except (ValueError, KeyError, TypeError, RecursionError) as exc:
            raise BadAnswer(f"unexpected {self.protocol} answer ({exc}): {body[:200]!r}") from None
        if not isinstance(answer, dict):
            raise BadAnswer(f"unexpected {self.protocol} answer: {body[:200]!r}")
        return answer

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
            conn.request("POST", f"{urlsplit(url).path}{self.path}", body=payload,
                         headers=self.headers | {"Content-Length": str(len(payload))})
            response = conn.getresponse()
            body = response.read()
        except (OSError, http.client.HTTPException):
            self._drop(url)
            raise
        if response.getheader("connection", "").lower() == "close":
            self._drop(url)
        return response.status, body

    def _ready_paths(self) -> list[str]:
        # KServe answers its own readiness paths; TorchServe answers neither (404) but has /ping
        kserve = {"kserve-v1": [f"/v1/models/{self.model}"], "kserve-v2": [f"/v2/models/{self.model}/ready"]}
        return kserve.get(self.protocol, []) + ["/ping"]

    def check_ready(self) -> None:
        for url in self.urls:
            for path in self._ready_paths():
                try:
                    response = requests.get(f"{url}{path}", headers=self.headers, timeout=(self.connect_timeout, 10))
                except requests.RequestException as exc:
                    raise ServerUnavailable(f"cannot reach {url}: {type(exc).__name__}; is the server running?") from None
                if response.status_code != 404 or path == "/ping":
                    break
            if response.status_code in (400, 401, 403) and "token" in response.text.lower():
                raise UsageError(f"{url} rejected the token: pass --token, set FRUIT_TOKEN, or point --key-file at "
                                 "the server's key_file.json")
            if response.status_code == 404 and self.protocol != "torchserve":
                # KServe answers its model path with 404 for a model it does not serve, and has no /ping
                # (TorchServe has /ping but no KServe readiness paths: it passes, and the first answer tells)
                raise self._no_model(url)
            if response.status_code != 200:
                raise ServerUnavailable(f"{url}{path} answered {response.status_code}: {response.text.strip()[:200]}")

    def _no_model(self, url: str) -> UsageError:
        hint = " and --host-header" if self.host_header else ""
        return UsageError(f"{url} does not serve a model named {self.model!r} (HTTP 404 on {self._ready_paths()[0]} "
                          f"/ {self.path}): check --model{hint}")

    def score_one(self, root: Path, rel: Path, attempt_offset: int, stop: threading.Event) -> Result:
        path = rel.as_posix()
        try:
            payload = self.encode((root / rel).read_bytes())
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
                    return self._result(path, body)
                if status == 404:  # the model, not the file: no other file would fare better
                    raise self._no_model(url)
                if status not in self.retry_statuses:
                    return Result.failed(path, _error_message(status, body), status)
                last = f"{url}: HTTP {status}"
                if status == 500 and attempt == self.retries:
                    # a 500 that stays may be this file's own (the handler answers 500 for one request it cannot
                    # read): a row for it, not the end of the run
                    return Result.failed(path, _error_message(status, body), status)
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
            unavailable: ServerUnavailable | UsageError | None = None
            try:
                while running:
                    finished, _ = wait(running, timeout=0.5, return_when=FIRST_COMPLETED)
                    for future in finished:
                        running.discard(future)
                        try:
                            yield future.result()
                        except (ServerUnavailable, UsageError) as exc:
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


    def _result(self, path: str, body: bytes) -> Result:
        """A row for a 200 answer; an answer in an unexpected shape is that file's error row, never an exception
        (this runs in a worker thread, where an exception would end the whole run)."""
        try:
            answer = self.decode(body)
            if "error" in answer and "label" not in answer:  # KServe answers 200 and puts the image's error in its slot
                code = answer.get("code")
                return Result.failed(path, str(answer["error"])[:300], code if isinstance(code, int) else None)
            return Result.ok(path, _checked_prediction(answer))
        except (BadAnswer, KeyError, TypeError, ValueError) as exc:
            message = str(exc) if isinstance(exc, BadAnswer) else f"unexpected {self.protocol} answer: {body[:200]!r}"
            return Result.failed(path, message)


def _checked_prediction(answer: dict) -> dict:
    """``answer`` if it has the types the CSV needs; ``Result.row`` formats them later, in the main thread."""
    number = (int, float)
    top_k = answer["top_k"]
    if not (isinstance(answer["label"], str) and isinstance(answer["confidence"], number)
            and not isinstance(answer["confidence"], bool) and isinstance(top_k, list)
            and all(isinstance(t, dict) and isinstance(t.get("label"), str)
                    and isinstance(t.get("probability"), number) for t in top_k)):
        raise TypeError("prediction fields of the wrong type")
    return answer


def _single(items: object) -> object:
    if not isinstance(items, list) or len(items) != 1:
        raise ValueError(f"expected one element, got {items!r:.80}")
    return items[0]


def _error_message(status: int, body: bytes) -> str:
    try:
        parsed = json.loads(body)
    except ValueError:
        return f"HTTP {status}: {body.decode('utf-8', 'replace').strip()[:300]}"
    if not isinstance(parsed, dict):
        return f"HTTP {status}: {str(parsed)[:300]}"
    return str(parsed.get("error") or parsed.get("message") or parsed)
