"""TorchServe handler for the fruit classifier.

TorchServe instantiates the one class this module defines, so helpers that are classes
live in the shared modules.

``initialize`` loads the TorchScript model, labels and metadata; ``preprocess`` decodes
each request with the shared preprocessing; ``forward`` scores the whole batch in chunks of
at most ``batchSize`` images; ``postprocess`` turns softmax into JSON. A request that is not a usable image
gets its own 4xx JSON answer through ``context.set_response_status``; TorchServe would
fail the whole batch if we raised, so bad input never raises.

KServe protocols are spoken here, per request, not by TorchServe's ``service_envelope``:
TorchServe 0.12's ``kserve``/``kservev2`` envelopes parse only the first request of a
server-side batch and return one answer for all of them, so with ``batchSize`` > 1 every
request of the batch gets ``503 number of batch response mismatched``. On TorchServe's KServe
routes (``/v1/models/fruit:predict``, ``/v2/models/fruit/infer``) a JSON body with a list of
``"instances"`` (v1) or of ``"inputs"`` (v2), and no plain payload key, gets a v1/v2 answer
(``kserve.py``); on ``/predictions/fruit`` every body is a plain request, as it always was.
When a server does set ``service_envelope`` anyway, the handler notices (the envelope is what
calls ``handle``) and answers each unwrapped row, but only ``batchSize: 1`` works there
(TorchServe's limit, not ours).
"""

from __future__ import annotations

import logging
import os
import sys
import time

import torch

try:  # inside the installed package
    from .artifacts import LABELS_FILE, METADATA_FILE, MODEL_FILE, check_outputs, load_for_inference, load_labels, load_metadata
    from .kserve import (
        DEFAULT_MAX_IMAGES,
        ENVELOPES,
        TS_ENVELOPE_V1,
        TS_ENVELOPE_V2,
        InternalError,
        extract_payload,
        format_answer,
        parse_envelope_row,
        parse_request,
        parse_top_k,
    )
    from .predictions import DEFAULT_TOP_K, Decoded, Parsed, clamp_top_k, format_predictions, probabilities
    from .preprocessing import InputError, PreprocessConfig, load_uint8, normalize
except ImportError:  # inside fruit.mar, where TorchServe puts these files side by side on sys.path
    from artifacts import LABELS_FILE, METADATA_FILE, MODEL_FILE, check_outputs, load_for_inference, load_labels, load_metadata
    from kserve import (
        DEFAULT_MAX_IMAGES,
        ENVELOPES,
        TS_ENVELOPE_V1,
        TS_ENVELOPE_V2,
        InternalError,
        extract_payload,
        format_answer,
        parse_envelope_row,
        parse_request,
        parse_top_k,
    )
    from predictions import DEFAULT_TOP_K, Decoded, Parsed, clamp_top_k, format_predictions, probabilities
    from preprocessing import InputError, PreprocessConfig, load_uint8, normalize

log = logging.getLogger(__name__)

TOP_K_HEADER = "X-Top-K"
# TorchServe 0.12's frontend adds this header to requests on /predictions only, not on its KServe routes
PLAIN_PATH_HEADER = "url_path"
# TorchServe's envelope classes (ts/torch_handler/request_envelope/) and the rows they hand the handler
ENVELOPE_CLASSES = {"KServeEnvelope": TS_ENVELOPE_V1, "KServev2Envelope": TS_ENVELOPE_V2, "JSONEnvelope": TS_ENVELOPE_V1}


def torchserve_envelope(context: object, caller: object) -> str | None:
    """Which of TorchServe's ``service_envelope`` wrappers called ``handle``, if any.

    TorchServe wraps the handler's ``handle`` in the envelope's own ``handle``
    (``ts/model_loader.py``), which calls us with the unwrapped rows: so the caller is the envelope.
    The kservev2 envelope also leaves ``input_names`` on the context while the batch runs. Neither
    depends on what a client sent, so no request can switch how the others are answered.
    """
    if type(caller).__module__.startswith("ts.torch_handler.request_envelope"):
        return ENVELOPE_CLASSES.get(type(caller).__name__)
    return TS_ENVELOPE_V2 if "input_names" in getattr(context, "__dict__", {}) else None


class FruitHandler:
    def __init__(self) -> None:
        self.initialized = False
        self.model: torch.jit.ScriptModule | None = None
        self.labels: list[str] = []
        self.config = PreprocessConfig()
        self.device = torch.device("cpu")
        self.default_top_k = DEFAULT_TOP_K
        self.model_version: str | None = None
        self.model_name = "fruit"
        self.max_images = DEFAULT_MAX_IMAGES
        self.batch_size = 1
        self.envelope: str | None = None
        self.context = None

    def initialize(self, context) -> None:
        properties = context.system_properties
        model_dir = properties.get("model_dir")
        gpu_id = properties.get("gpu_id")
        if torch.cuda.is_available() and gpu_id is not None:
            self.device = torch.device(f"cuda:{gpu_id}")
        settings = (getattr(context, "model_yaml_config", None) or {}).get("handler", {}) or {}
        threads = int(settings.get("torch_threads") or _threads_per_worker(context))
        torch.set_num_threads(max(1, threads))

        metadata = load_metadata(os.path.join(model_dir, METADATA_FILE))
        self.config = PreprocessConfig.from_metadata(metadata)
        if settings.get("max_pixels"):
            self.config = PreprocessConfig(self.config.input_size, self.config.mean, self.config.std,
                                           int(settings["max_pixels"]))
        self.labels = load_labels(os.path.join(model_dir, LABELS_FILE))
        self.default_top_k = int(settings.get("top_k", DEFAULT_TOP_K))
        self.max_images = max(1, int(settings.get("max_images_per_request") or DEFAULT_MAX_IMAGES))
        self.batch_size = max(1, int(properties.get("batch_size") or 1))
        manifest = (getattr(context, "manifest", None) or {}).get("model") or {}
        self.model_version = str(manifest.get("modelVersion") or metadata.get("model_version"))
        self.model_name = str(manifest.get("modelName") or getattr(context, "model_name", None) or self.model_name)
        self.model = load_for_inference(os.path.join(model_dir, MODEL_FILE), self.device)
        check_outputs(self.model, len(self.labels), self.config.input_size, self.device)
        log.info("fruit model %s on %s: %d classes, input %dpx, %d threads", self.model_version, self.device,
                 len(self.labels), self.config.input_size, torch.get_num_threads())
        self.initialized = True

    def preprocess(self, data: list) -> list[Parsed]:
        """Each row on its own: how one request is read never depends on the other requests of the batch."""
        parsed = []
        for idx, row in enumerate(data):
            try:
                parsed.append(self._parse(idx, row))
            except InputError as exc:
                parsed.append(Parsed([], self.envelope, error=exc))
            except Exception:  # noqa: BLE001 - the last guard: raising here would fail every request of the batch
                log.exception("unexpected error reading request %d of the batch (answered 500)", idx)
                error = InternalError("internal error while reading this request; the server log has the details")
                parsed.append(Parsed([], self.envelope, error=error))
        return parsed

    def _parse(self, idx: int, row: object) -> Parsed:
        if self.envelope is not None:
            plan = parse_envelope_row(row, self.envelope)
        else:
            plan = parse_request(row, parse_top_k(self._header(idx, TOP_K_HEADER)),
                                 plain_path=self._header(idx, PLAIN_PATH_HEADER) is not None,
                                 max_images=self.max_images)
        items = [self._decode(value, k) for value, k in plan.images]
        return Parsed(items, plan.protocol, plan.request_id, plan.outputs)

    def _decode(self, value: object, default_k: int | None) -> Decoded:
        """One image; its error stays in its own slot, so the other images of a request are still scored."""
        try:
            payload, k = extract_payload(value)
            tensor = load_uint8(payload, self.config)
        except InputError as exc:
            return Decoded(None, 1, exc)
        return Decoded(tensor, clamp_top_k(k or default_k, len(self.labels), self.default_top_k))

    def inference(self, batch: torch.Tensor) -> torch.Tensor:
        """One forward pass for the images of one chunk of the server-side batch."""
        with torch.inference_mode():
            inputs = normalize(batch.to(self.device, non_blocking=True), self.config.mean, self.config.std)
            with torch.autocast("cuda", enabled=self.device.type == "cuda"):
                return self.model(inputs)

    def forward(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """Logits for every valid image, in chunks of at most ``batch_size``: requests with many images each
        (KServe) must not turn one server-side batch into one huge forward pass."""
        if not tensors:
            return torch.empty(0, len(self.labels))
        chunks = [self.inference(torch.stack(tensors[i:i + self.batch_size]))
                  for i in range(0, len(tensors), self.batch_size)]
        return chunks[0] if len(chunks) == 1 else torch.cat(chunks)

    def postprocess(self, logits: torch.Tensor, parsed: list[Parsed]) -> list[dict | str]:
        ok = [d for p in parsed for d in p.items if d.error is None]
        predictions = iter(format_predictions(probabilities(logits), self.labels, [d.top_k for d in ok],
                                              self.model_version)) if ok else iter(())
        responses: list[dict | str] = []
        for idx, request in enumerate(parsed):
            answers = [next(predictions) if d.error is None else d.error.to_dict() for d in request.items]
            responses.append(format_answer(request.protocol, answers, model_name=self.model_name,
                                           model_version=self.model_version, outputs=request.outputs,
                                           request_id=request.request_id, fallback_id=self._request_id(idx),
                                           error=request.error))
            self._respond(idx, request)
        return responses

    def _respond(self, idx: int, request: Parsed) -> None:
        """Status and content type of request ``idx``. Under TorchServe's envelope a row is an image, not a
        request: the envelope answers for the request, so nothing here is ours to set."""
        if request.protocol in ENVELOPES:
            return
        self._set_json(idx)
        error = request.error
        if error is None and request.protocol is None:  # a plain request answers with its one image's status
            error = request.items[0].error
        if error is not None:
            self._set_status(idx, error)

    def handle(self, data: list, context) -> list[dict | str]:
        self.context = context
        self.envelope = torchserve_envelope(context, sys._getframe(1).f_locals.get("self"))
        start = time.perf_counter()
        parsed = self.preprocess(data)
        logits = self.forward([d.tensor for p in parsed for d in p.items if d.tensor is not None])
        responses = self.postprocess(logits, parsed)
        metrics = getattr(context, "metrics", None)
        if metrics is not None:
            metrics.add_time("HandlerTime", round((time.perf_counter() - start) * 1000, 2), None, "ms")
        return responses

    def _request_id(self, idx: int) -> str | None:
        request_ids = getattr(self.context, "request_ids", None) or {}
        return request_ids.get(idx)

    def _is_request(self, idx: int) -> bool:
        """Row ``idx`` is a request of TorchServe's (not an instance an envelope unwrapped, nor a test's row)."""
        return self.context is not None and idx < len(getattr(self.context, "request_ids", None) or {})

    def _header(self, idx: int, name: str) -> str | None:
        if not self._is_request(idx):
            return None
        return self.context.get_request_header(idx, name) or self.context.get_request_header(idx, name.lower())

    def _set_status(self, idx: int, error: InputError) -> None:
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
