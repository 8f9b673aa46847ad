"""TorchServe handler for the fruit classifier.

TorchServe instantiates the one class this module defines, so helpers that are classes
live in the shared modules.

``initialize`` loads the TorchScript model, labels and metadata; ``preprocess`` decodes
each request with the shared preprocessing; ``inference`` runs one forward for the whole
batch; ``postprocess`` turns softmax into JSON. A request that is not a usable image
gets its own 4xx JSON answer through ``context.set_response_status``; TorchServe would
fail the whole batch if we raised, so bad input never raises.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import time

import torch

try:  # inside the installed package
    from .artifacts import LABELS_FILE, METADATA_FILE, MODEL_FILE, load_labels, load_metadata, load_torchscript
    from .predictions import DEFAULT_TOP_K, Decoded, clamp_top_k, format_predictions, probabilities
    from .preprocessing import InputError, PreprocessConfig, load_uint8, normalize
except ImportError:  # inside fruit.mar, where TorchServe puts these files side by side on sys.path
    from artifacts import LABELS_FILE, METADATA_FILE, MODEL_FILE, load_labels, load_metadata, load_torchscript
    from predictions import DEFAULT_TOP_K, Decoded, clamp_top_k, format_predictions, probabilities
    from preprocessing import InputError, PreprocessConfig, load_uint8, normalize

log = logging.getLogger(__name__)

PAYLOAD_KEYS = ("data", "body", "file", "image", "b64", "bytes", "instances")
TOP_K_KEYS = ("top_k", "topk", "k")
TOP_K_HEADER = "X-Top-K"


def extract_payload(row: object) -> tuple[bytes, int | None]:
    """Image bytes (and a requested top-k, if any) from whatever TorchServe hands us for one request.

    Raw bodies arrive as bytes; multipart uploads as bytes under the form field's name;
    ``application/json`` bodies already parsed, with the image base64-encoded.
    """
    top_k = None
    if isinstance(row, dict):
        top_k = _parse_top_k(next((row[k] for k in TOP_K_KEYS if k in row), None))
        value = next((row[k] for k in PAYLOAD_KEYS if row.get(k) is not None), None)
        if value is None:  # multipart with an unusual field name: take the one file-like value
            value = next((v for v in row.values() if isinstance(v, (bytes, bytearray))), None)
        if value is None:
            raise InputError("no image in the request: send the image bytes as the body, a multipart file, "
                             'or JSON {"data": "<base64>"}')
        if isinstance(value, dict) or (isinstance(value, list) and value):
            inner, inner_k = extract_payload(value if isinstance(value, dict) else _single(value))
            return inner, inner_k if inner_k is not None else top_k
        row = value
    if isinstance(row, (bytes, bytearray, str)):
        # JSON sent as text/plain or without a content type arrives unparsed
        head = row.lstrip()[:1]
        if head in (b"{", "{"):
            try:
                parsed = json.loads(row)
            except (ValueError, UnicodeDecodeError):
                parsed = None
            if isinstance(parsed, dict):
                return extract_payload(parsed)
        if isinstance(row, str):
            return _b64decode(row), top_k
        return bytes(row), top_k
    if isinstance(row, list):
        return extract_payload(_single(row))
    raise InputError(f"unsupported request payload of type {type(row).__name__}")


def _single(items: list) -> object:
    if len(items) != 1:
        raise InputError(f"send one image per request (got a list of {len(items)}); TorchServe batches requests itself")
    return items[0]


def _b64decode(text: str) -> bytes:
    if text.startswith("data:") and "," in text:  # data URL
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise InputError("the image string is not valid base64") from None


def _parse_top_k(value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray)):
        value = value.decode("utf-8", "replace")
    try:
        k = int(str(value).strip())
    except ValueError:
        raise InputError(f"top_k must be a positive integer, got {value!r}") from None
    if k < 1:
        raise InputError(f"top_k must be a positive integer, got {k}")
    return k


class FruitHandler:
    def __init__(self) -> None:
        self.initialized = False
        self.model: torch.jit.ScriptModule | None = None
        self.labels: list[str] = []
        self.config = PreprocessConfig()
        self.device = torch.device("cpu")
        self.default_top_k = DEFAULT_TOP_K
        self.model_version: str | None = None
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
        manifest_version = ((getattr(context, "manifest", None) or {}).get("model") or {}).get("modelVersion")
        self.model_version = str(manifest_version or metadata.get("model_version"))
        self.model = load_torchscript(os.path.join(model_dir, MODEL_FILE), self.device)
        self._warm_up()
        log.info("fruit model %s on %s: %d classes, input %dpx, %d threads", self.model_version, self.device,
                 len(self.labels), self.config.input_size, torch.get_num_threads())
        self.initialized = True

    def _warm_up(self) -> None:
        size = self.config.input_size
        with torch.inference_mode():
            for batch in (1, 8):
                self.model(torch.zeros(batch, 3, size, size, device=self.device))

    def preprocess(self, data: list) -> list[Decoded]:
        decoded = []
        for idx, row in enumerate(data):
            try:
                payload, k = extract_payload(row)
                k = k or _parse_top_k(self._header(idx, TOP_K_HEADER))
                tensor = load_uint8(payload, self.config)
                decoded.append(Decoded(tensor, clamp_top_k(k, len(self.labels), self.default_top_k)))
            except InputError as exc:
                decoded.append(Decoded(None, 1, exc))
        return decoded

    def inference(self, batch: torch.Tensor) -> torch.Tensor:
        """One forward pass for every valid image of the server-side batch."""
        with torch.inference_mode():
            inputs = normalize(batch.to(self.device, non_blocking=True), self.config.mean, self.config.std)
            with torch.autocast("cuda", enabled=self.device.type == "cuda"):
                return self.model(inputs)

    def postprocess(self, logits: torch.Tensor, decoded: list[Decoded]) -> list[dict]:
        ok = [d for d in decoded if d.error is None]
        predictions = iter(format_predictions(probabilities(logits), self.labels, [d.top_k for d in ok],
                                              self.model_version)) if ok else iter(())
        responses = []
        for idx, item in enumerate(decoded):
            if item.error is None:
                body = next(predictions)
            else:
                body = item.error.to_dict()
                self._set_status(idx, item.error)
            self._set_json(idx)
            responses.append(body)  # TorchServe serialises dicts; a KServe envelope nests them as objects
        return responses

    def handle(self, data: list, context) -> list[dict]:
        self.context = context
        start = time.perf_counter()
        decoded = self.preprocess(data)
        valid = [d.tensor for d in decoded if d.tensor is not None]
        logits = self.inference(torch.stack(valid)) if valid else torch.empty(0, len(self.labels))
        responses = self.postprocess(logits, decoded)
        metrics = getattr(context, "metrics", None)
        if metrics is not None:
            metrics.add_time("HandlerTime", round((time.perf_counter() - start) * 1000, 2), None, "ms")
        return responses

    def _header(self, idx: int, name: str) -> str | None:
        if self.context is None or idx >= len(getattr(self.context, "request_ids", {}) or {}):
            return None
        return self.context.get_request_header(idx, name) or self.context.get_request_header(idx, name.lower())

    def _set_status(self, idx: int, error: InputError) -> None:
        # Under a KServe envelope there are more instances than requests: the error stays in the JSON only.
        if self.context is not None and idx < len(self.context.request_ids or {}):
            self.context.set_response_status(error.status, str(error), idx)

    def _set_json(self, idx: int) -> None:
        if self.context is not None and idx < len(self.context.request_ids or {}):
            self.context.set_response_content_type(idx, "application/json")


def _threads_per_worker(context) -> int:
    """Share the cores between this model's workers (TorchServe starts ``minWorkers`` of them)."""
    yaml_config = getattr(context, "model_yaml_config", None) or {}
    workers = int(yaml_config.get("minWorkers") or 1)
    return max(1, (os.cpu_count() or 1) // max(1, workers))
