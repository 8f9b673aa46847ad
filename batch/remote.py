"""Score files against running TorchServe servers over keep-alive HTTP, with retries and timeouts.

``protocol`` picks the request format and path: ``torchserve`` posts the raw file to
``/predictions/{model}``; ``kserve-v1`` posts ``{"instances": [{"data": "<base64>"}]}`` to
``/v1/models/{model}:predict``; ``kserve-v2`` posts a BYTES input to ``/v2/models/{model}/infer``.
The KServe paths are the same on a KServe InferenceService and on TorchServe itself (its
frontend routes them to the model), so ``--url`` is always just the base address.
"""

from __future__ import annotations

import asyncio
import base64
import json
import queue
import random
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from urllib.parse import quote, urlsplit

from .errors import ServerUnavailable, UsageError
from .http1 import Connection, ProtocolError, Response, request_once
from .results import Result
from .sources import Source

# Worth another try: overloaded (503), and a worker that died mid-batch (507 "Worker died.", or 500 when the kill
# lands while the answer is being sent: both seen in RELIABILITY.md's kill runs). Any other 4xx/5xx is final,
# and a 500 that stays is the file's own error row.
RETRY_STATUSES = {500, 503, 507}
# KServe's wrapper answers 500 for whatever TorchServe refused (overload included) and its ingress 502/504 while
# a pod starts or is replaced.
KSERVE_RETRY_STATUSES = RETRY_STATUSES | {502, 504}
PROTOCOLS = ("torchserve", "kserve-v1", "kserve-v2")
# A failed attempt, worth another: refused or reset connections, TLS errors, timeouts, answers cut short
# (asyncio.IncompleteReadError is an EOFError) or not HTTP.
NETWORK_ERRORS = (OSError, EOFError, TimeoutError, ProtocolError, asyncio.LimitOverrunError)
_DONE = object()



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
    uncertainty: dict = field(default_factory=dict)  # --min-confidence / --max-distance: flag more than the server

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
        model = quote(self.model, safe="")
        return {"torchserve": f"/predictions/{model}", "kserve-v1": f"/v1/models/{model}:predict",
                "kserve-v2": f"/v2/models/{model}/infer"}[self.protocol]

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
                answer = _only_element(answer["predictions"])
            elif self.protocol == "kserve-v2":
                answer = _only_element(_only_element(answer["outputs"])["data"])
            if isinstance(answer, str):  # v2 BYTES carry the answer's JSON as a string
                answer = json.loads(answer)
        except (ValueError, KeyError, TypeError, RecursionError) as exc:
            raise BadAnswer(f"unexpected {self.protocol} answer ({exc}): {body[:200]!r}") from None
        if not isinstance(answer, dict):
            raise BadAnswer(f"unexpected {self.protocol} answer: {body[:200]!r}")
        return answer

    async def _post(self, connections: dict[str, Connection], url: str, payload: bytes) -> Response:
        conn = connections.get(url)
        if conn is None:
            conn = connections[url] = Connection(url, self.connect_timeout)
        async with asyncio.timeout(self.timeout):
            return await conn.request("POST", f"{urlsplit(url).path}{self.path}", self.headers, payload)

    def _ready_paths(self) -> list[str]:
        # KServe answers its own readiness paths; TorchServe answers neither (404) but has /ping
        kserve = {"kserve-v1": [f"/v1/models/{self.model}"], "kserve-v2": [f"/v2/models/{self.model}/ready"]}
        return kserve.get(self.protocol, []) + ["/ping"]

    def check_ready(self) -> None:
        for url in self.urls:
            for path in self._ready_paths():
                try:
                    response = request_once(url, "GET", f"{urlsplit(url).path}{path}", self.headers, timeout=10,
                                            connect_timeout=self.connect_timeout)
                except NETWORK_ERRORS as exc:
                    raise ServerUnavailable(f"cannot reach {url}: {type(exc).__name__}; is the server running?") from None
                if response.status != 404 or path == "/ping":
                    break
            text = response.body.decode("utf-8", "replace")
            if response.status in (400, 401, 403) and "token" in text.lower():
                raise UsageError(f"{url} rejected the token: pass --token, set FRUIT_TOKEN, or point --key-file at "
                                 "the server's key_file.json")
            if response.status == 404 and self.protocol != "torchserve":
                # KServe answers its model path with 404 for a model it does not serve, and has no /ping
                # (TorchServe has /ping but no KServe readiness paths: it passes, and the first answer tells)
                raise self._no_model(url)
            if response.status != 200:
                raise ServerUnavailable(f"{url}{path} answered {response.status}: {text.strip()[:200]}")

    def _no_model(self, url: str) -> UsageError:
        hint = " and --host-header" if self.host_header else ""
        return UsageError(f"{url} does not serve a model named {self.model!r} (HTTP 404 on {self._ready_paths()[0]} "
                          f"/ {self.path}): check --model{hint}")

    def _job(self, todo: Iterator[tuple[int, str]], source: Source, stop: threading.Event) -> _Job | Result | None:
        """The next file, read and encoded; its error row if it cannot be read; None when none is left."""
        item = None if stop.is_set() else next(todo, None)
        if item is None:
            return None
        index, rel = item
        try:
            return _Job(index, rel, self.encode(source.read(rel)))
        except OSError as exc:
            return Result.failed(rel, f"cannot read file: {exc.strerror or exc}")

    async def _send(self, connections: dict[str, Connection], job: _Job, stop: threading.Event) -> Response | Result:
        """The server's 200 answer for ``job``, or its final error row, after as many tries as it takes."""
        last = ""
        for attempt in range(self.retries + 1):
            url = self.urls[(job.index + attempt) % len(self.urls)]
            try:
                response = await self._post(connections, url, job.payload)
            except NETWORK_ERRORS as exc:
                last = f"{url}: {type(exc).__name__}"
            else:
                status, body = response.status, response.body
                if status == 200:
                    return response
                if status == 404:  # the model, not the file: no other file would fare better
                    raise self._no_model(url)
                if status not in self.retry_statuses:
                    return Result.failed(job.path, _error_message(status, body), status)
                last = f"{url}: HTTP {status}"
                if status == 500 and attempt == self.retries:
                    # a 500 that stays may be this file's own (the handler answers 500 for one request it cannot
                    # read): a row for it, not the end of the run
                    return Result.failed(job.path, _error_message(status, body), status)
            pause = min(10.0, self.backoff * 2**attempt) * (0.5 + random.random())
            if attempt < self.retries and await _pause(pause, stop):
                break  # the run is stopping: leave this file for --resume
        raise ServerUnavailable(f"gave up on {job.path} after {self.retries + 1} attempts ({last})")

    async def _lane(self, todo: Iterator[tuple[int, str]], source: Source, stop: threading.Event,
                    finished: queue.SimpleQueue) -> None:
        """One file at a time, on this lane's own keep-alive connections, until the files or the run end; each
        result goes to the caller's thread as soon as it is known."""
        connections: dict[str, Connection] = {}
        try:
            while (job := self._job(todo, source, stop)) is not None:
                if isinstance(job, Result):
                    finished.put([job])
                    continue
                try:
                    outcome = await self._send(connections, job, stop)
                except (ServerUnavailable, UsageError) as exc:
                    # stop starting new files, but keep what the other lanes' requests in flight bring back
                    stop.set()
                    finished.put([exc])
                    return
                finished.put([outcome if isinstance(outcome, Result) else self._result(job.path, outcome.body)])
        finally:
            for conn in connections.values():
                conn.close()

    async def _lanes(self, source: Source, paths: list[str], stop: threading.Event, closing: threading.Event,
                     finished: queue.SimpleQueue) -> None:
        todo = iter(enumerate(paths))
        lanes = [asyncio.create_task(self._lane(todo, source, stop, finished)) for _ in range(self.concurrency)]

        def failed(lane: asyncio.Task) -> None:  # a bug in a lane ends the run now, not when the others finish
            if not lane.cancelled() and lane.exception() is not None:
                stop.set()
                finished.put([lane.exception()])

        for lane in lanes:
            lane.add_done_callback(failed)
        while not all(lane.done() for lane in lanes):
            if closing.is_set():  # the caller went away (Ctrl-C): requests in flight are dropped, --resume redoes them
                for lane in lanes:
                    lane.cancel()
            await asyncio.wait(lanes, timeout=0.1)
        await asyncio.sleep(0)  # the lanes' done callbacks run

    def score(self, source: Source, paths: list[str], stop: threading.Event) -> Iterator[Result]:
        """Results in completion order; at most ``concurrency`` requests (and files) are in flight. The requests
        run on one event loop in a helper thread; this thread only writes what comes back."""
        self.check_ready()
        finished: queue.SimpleQueue = queue.SimpleQueue()
        closing = threading.Event()

        def run() -> None:
            try:
                asyncio.run(self._lanes(source, paths, stop, closing, finished))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread, which raises it
                finished.put([exc])
            finally:
                finished.put(_DONE)

        thread = threading.Thread(target=run, name="fruit-batch-http", daemon=True)
        thread.start()
        unavailable: ServerUnavailable | UsageError | None = None
        try:
            while (items := _next(finished)) is not _DONE:
                for item in items:
                    if isinstance(item, (ServerUnavailable, UsageError)):
                        unavailable = unavailable or item
                    elif isinstance(item, BaseException):
                        raise item
                    else:
                        yield item
        finally:
            stop.set()
            closing.set()
            thread.join()
        if unavailable is not None:
            raise unavailable

    def _result(self, path: str, body: bytes) -> Result:
        """A row for a 200 answer; an answer in an unexpected shape is that file's error row, never an exception
        (one odd answer must not end the whole run)."""
        try:
            answer = self.decode(body)
            if "error" in answer and "label" not in answer:  # KServe answers 200 and puts the image's error in its slot
                code = answer.get("code")
                return Result.failed(path, str(answer["error"])[:300], code if isinstance(code, int) else None)
            return Result.ok(path, flag_more(_checked_prediction(answer), self.uncertainty))
        except (BadAnswer, KeyError, TypeError, ValueError) as exc:
            message = str(exc) if isinstance(exc, BadAnswer) else f"unexpected {self.protocol} answer: {body[:200]!r}"
            return Result.failed(path, message)


def flag_more(answer: dict, thresholds: dict) -> dict:
    """``answer``, also flagged uncertain where the client's stricter thresholds say so (a client cannot see the
    server's thresholds, so it can only add flags, never remove the server's)."""
    score = answer.get("ood_score")
    if answer["confidence"] < thresholds.get("min_confidence", 0.0) or (
            score is not None and score > thresholds.get("max_distance", float("inf"))):
        return answer | {"uncertain": True}
    return answer


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


@dataclass
class _Job:
    index: int  # the file's place in the run: which server it tries first
    path: str
    payload: bytes


def _next(finished: queue.SimpleQueue) -> object:
    """The next bunch of items, waiting in short steps so that Ctrl-C reaches this thread at once."""
    while True:
        try:
            return finished.get(timeout=0.5)
        except queue.Empty:
            pass


async def _pause(seconds: float, stop: threading.Event) -> bool:
    """Sleep ``seconds`` unless the run stops first; True if it did."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not stop.is_set():
        left = deadline - loop.time()
        if left <= 0:
            return False
        await asyncio.sleep(min(left, 0.1))
    return True


def _only_element(items: object) -> object:
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
