"""TorchServe handler for the fruit classifier.

TorchServe instantiates the one class this module defines, so helpers that are classes live in the
other modules of ``fruitserve.handler``, which ``fruit.mar`` carries as a package beside this file.

``initialize`` loads the model through ``classifier.load_classifier`` (the loader ``fruit-batch --local``,
``fruit-train evaluate`` and the benchmarks use too); ``preprocess`` reads each request with the shared
preprocessing; ``inference`` scores every valid image of the batch; ``postprocess`` writes one answer per
request. A request that is not a usable image gets its own 4xx JSON answer through
``context.set_response_status``; TorchServe would fail the whole batch if we raised, so bad input never raises.

KServe protocols are spoken here, per request: on TorchServe's KServe routes (``/v1/models/fruit:predict``,
``/v2/models/fruit/infer``) a JSON body with a list of ``"instances"`` (v1) or of ``"inputs"`` (v2), and no
plain payload key, gets a v1/v2 answer (``protocols.py``); on ``/predictions/fruit`` every body is a plain
request. TorchServe's own ``service_envelope`` is refused at ``initialize``: in 0.12 it parses only the first
request of a server-side batch and answers ``503`` for all of them when ``batchSize`` > 1.
"""

from __future__ import annotations

import logging
import os
import sys
import time

import torch
from fruitserve.handler.classifier import Classifier, load_classifier
from fruitserve.handler.errors import HandlerFailure, InputError, RequestError
from fruitserve.handler.predictions import DEFAULT_TOP_K, clamp_top_k
from fruitserve.handler.preprocessing import load_uint8
from fruitserve.handler.protocols import (
    DEFAULT_MAX_IMAGES,
    Decoded,
    Parsed,
    extract_payload,
    format_answer,
    parse_request,
    parse_top_k,
)

log = logging.getLogger(__name__)

TOP_K_HEADER = "X-Top-K"
# TorchServe 0.12's frontend adds this header to requests on /predictions only, not on its KServe routes
PLAIN_PATH_HEADER = "url_path"


def configured_envelope() -> str | None:
    """The ``service_envelope`` TorchServe wrapped this handler in, if any.

    TorchServe 0.12 tells a handler nothing about it: its ``ModelLoader.load`` wraps ``handle`` in the envelope
    and then calls ``initialize`` with its ``envelope`` argument still in scope. Read once, at start-up.
    """
    frame = sys._getframe(2)  # ModelLoader.load -> FruitHandler.initialize -> here
    if frame.f_code.co_name == "load" and "envelope" in frame.f_locals:
        return frame.f_locals["envelope"]
    return None


class FruitHandler:
    def __init__(self) -> None:
        self.initialized = False
        self.classifier: Classifier | None = None
        self.default_top_k = DEFAULT_TOP_K
        self.model_name = "fruit"
        self.max_images = DEFAULT_MAX_IMAGES
        self.context = None

    def initialize(self, context) -> None:
        envelope = configured_envelope()
        if envelope:
            raise RuntimeError(f"service_envelope={envelope} is set: remove service_envelope from config.properties "
                               "(or TS_SERVICE_ENVELOPE from the environment). The fruit handler answers KServe v1 "
                               "and v2 itself on /v1/models/<name>:predict and /v2/models/<name>/infer, and "
                               "TorchServe 0.12's envelopes fail every batch of more than one request")
        properties = context.system_properties
        settings = (getattr(context, "model_yaml_config", None) or {}).get("handler", {}) or {}
        torch.set_num_threads(max(1, int(settings.get("torch_threads") or _threads_per_worker(context))))
        gpu_id = properties.get("gpu_id")
        device = f"cuda:{gpu_id}" if torch.cuda.is_available() and gpu_id is not None else "cpu"
        self.classifier = load_classifier(properties.get("model_dir"), device=device,
                                          precision=str(settings.get("precision") or "auto"),
                                          max_batch=max(1, int(properties.get("batch_size") or 1)),
                                          max_pixels=settings.get("max_pixels"),
                                          uncertainty={k: settings.get(k) for k in ("min_confidence", "max_distance")})
        manifest = (getattr(context, "manifest", None) or {}).get("model") or {}
        self.classifier.model_version = str(manifest.get("modelVersion") or self.classifier.model_version)
        self.model_name = str(manifest.get("modelName") or getattr(context, "model_name", None) or self.model_name)
        self.default_top_k = int(settings.get("top_k", DEFAULT_TOP_K))
        self.max_images = max(1, int(settings.get("max_images_per_request") or DEFAULT_MAX_IMAGES))
        log.info("fruit model %s ready: %d torch threads, batches of up to %d", self.classifier.model_version,
                 torch.get_num_threads(), self.classifier.max_batch)
        self.initialized = True

    def preprocess(self, data: list) -> list[Parsed]:
        """Each row on its own: how one request is read never depends on the other requests of the batch."""
        parsed = []
        for idx, row in enumerate(data):
            try:
                parsed.append(self._parse(idx, row))
            except InputError as exc:
                parsed.append(Parsed([], error=exc))
            except Exception:  # noqa: BLE001 - the last guard: raising here would fail every request of the batch
                log.exception("unexpected error reading request %d of the batch (answered 500)", idx)
                failure = HandlerFailure("internal error while reading this request; the server log has the details")
                parsed.append(Parsed([], error=failure))
        return parsed

    def _parse(self, idx: int, row: object) -> Parsed:
        plan = parse_request(row, parse_top_k(self._header(idx, TOP_K_HEADER)),
                             plain_path=self._header(idx, PLAIN_PATH_HEADER) is not None, max_images=self.max_images)
        items = [self._decode(value, k) for value, k in plan.images]
        return Parsed(items, plan.protocol, plan.request_id, plan.outputs)

    def _decode(self, value: object, default_k: int | None) -> Decoded:
        """One image; its error stays in its own slot, so the other images of a request are still scored."""
        try:
            payload, k = extract_payload(value)
            tensor = load_uint8(payload, self.classifier.config)
        except InputError as exc:
            return Decoded(None, 1, exc)
        return Decoded(tensor, clamp_top_k(k or default_k, len(self.classifier.labels), self.default_top_k))

    def inference(self, parsed: list[Parsed]) -> list[dict]:
        """One answer per valid image of the whole server-side batch, in order; the classifier runs it in chunks of
        at most ``batchSize`` images, so requests with many images each (KServe) cannot make one huge forward."""
        valid = [d for p in parsed for d in p.items if d.tensor is not None]
        if not valid:
            return []
        return self.classifier.answers(torch.stack([d.tensor for d in valid]), [d.top_k for d in valid])

    def postprocess(self, answers: list[dict], parsed: list[Parsed]) -> list[dict]:
        predictions = iter(answers)
        responses = []
        for idx, request in enumerate(parsed):
            images = [next(predictions) if d.error is None else d.error.to_dict() for d in request.items]
            responses.append(format_answer(request, images, model_name=self.model_name,
                                           model_version=self.classifier.model_version,
                                           fallback_id=self._request_id(idx)))
            self._respond(idx, request)
        return responses

    def _respond(self, idx: int, request: Parsed) -> None:
        """Content type and status of request ``idx``: a plain request answers with its one image's status."""
        self._set_json(idx)
        error = request.error
        if error is None and request.protocol is None:
            error = request.items[0].error
        if error is not None:
            self._set_status(idx, error)

    def handle(self, data: list, context) -> list[dict]:
        self.context = context
        start = time.perf_counter()
        parsed = self.preprocess(data)
        responses = self.postprocess(self.inference(parsed), parsed)
        metrics = getattr(context, "metrics", None)
        if metrics is not None:
            metrics.add_time("HandlerTime", round((time.perf_counter() - start) * 1000, 2), None, "ms")
        return responses

    def _request_id(self, idx: int) -> str | None:
        request_ids = getattr(self.context, "request_ids", None) or {}
        return request_ids.get(idx)

    def _is_request(self, idx: int) -> bool:
        """Row ``idx`` is one of TorchServe's requests (a test may call ``handle`` without a context)."""
        return self.context is not None and idx < len(getattr(self.context, "request_ids", None) or {})

    def _header(self, idx: int, name: str) -> str | None:
        if not self._is_request(idx):
            return None
        return self.context.get_request_header(idx, name) or self.context.get_request_header(idx, name.lower())

    def _set_status(self, idx: int, error: RequestError) -> None:
        if self._is_request(idx):
            self.context.set_response_status(error.status, str(error), idx)

    def _set_json(self, idx: int) -> None:
        if self._is_request(idx):
            self.context.set_response_content_type(idx, "application/json")


def _threads_per_worker(context) -> int:
    """Share the cores between this model's workers (TorchServe starts ``minWorkers`` of them)."""
    yaml_config = getattr(context, "model_yaml_config", None) or {}
    workers = int(yaml_config.get("minWorkers") or 1)
    return max(1, (os.cpu_count() or 1) // max(1, workers))
