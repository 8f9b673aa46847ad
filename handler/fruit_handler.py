"""TorchServe handler for the fruit classifier.

TorchServe instantiates the one class this module defines, so helpers that are classes
live in the shared modules.

``initialize`` loads the TorchScript model, labels and metadata; ``preprocess`` decodes
each request with the shared preprocessing; ``inference`` runs one forward for the whole
batch; ``postprocess`` turns softmax into JSON. A request that is not a usable image
gets its own 4xx JSON answer through ``context.set_response_status``; TorchServe would
fail the whole batch if we raised, so bad input never raises.

KServe protocols are spoken here, per request, not by TorchServe's ``service_envelope``:
TorchServe 0.12's ``kserve``/``kservev2`` envelopes parse only the first request of a
server-side batch and return one answer for all of them, so with ``batchSize`` > 1 every
request of the batch gets ``503 number of batch response mismatched``. A JSON body with
``"instances"`` (v1) or ``"inputs"`` (v2) gets a v1/v2 answer, whatever the path it came
on (``/predictions/fruit``, ``/v1/models/fruit:predict``, ``/v2/models/fruit/infer``).
When a server does set ``service_envelope`` anyway, the handler still answers correctly,
but only ``batchSize: 1`` works there (TorchServe's limit, not ours).
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
    from .artifacts import LABELS_FILE, METADATA_FILE, MODEL_FILE, check_outputs, load_labels, load_metadata, load_torchscript
    from .predictions import DEFAULT_TOP_K, Decoded, Parsed, clamp_top_k, format_predictions, probabilities
    from .preprocessing import InputError, PreprocessConfig, load_uint8, normalize
except ImportError:  # inside fruit.mar, where TorchServe puts these files side by side on sys.path
    from artifacts import LABELS_FILE, METADATA_FILE, MODEL_FILE, check_outputs, load_labels, load_metadata, load_torchscript
    from predictions import DEFAULT_TOP_K, Decoded, Parsed, clamp_top_k, format_predictions, probabilities
    from preprocessing import InputError, PreprocessConfig, load_uint8, normalize

log = logging.getLogger(__name__)

PAYLOAD_KEYS = ("data", "body", "file", "image", "b64", "bytes")
TOP_K_KEYS = ("top_k", "topk", "k")
TOP_K_HEADER = "X-Top-K"

KSERVE_V1 = "kserve-v1"
KSERVE_V2 = "kserve-v2"
# Set when TorchServe's own envelope already unwrapped the request: each row is one instance (v1) or one input (v2).
TS_ENVELOPE_V1 = "ts-envelope-v1"
TS_ENVELOPE_V2 = "ts-envelope-v2"


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


def json_body(row: object) -> dict | None:
    """The request's JSON object, if its body is one (parsed by TorchServe or still text)."""
    value = row
    if isinstance(row, dict):
        value = next((row[k] for k in ("body", "data") if row.get(k) is not None), None)
    if isinstance(value, dict):
        return value
    if isinstance(value, (bytes, bytearray, str)) and value[:64].lstrip()[:1] in (b"{", "{"):
        # JSON with a charset in its content type, or none at all, reaches the handler unparsed
        try:
            parsed = json.loads(value)
        except (ValueError, UnicodeDecodeError):
            return None
        return parsed if isinstance(parsed, dict) else None
    return None


def kserve_protocol(body: dict | None) -> str | None:
    if body is None:
        return None
    if "instances" in body:
        return KSERVE_V1
    if "inputs" in body:
        return KSERVE_V2
    return None


def ts_envelope(data: list, n_requests: int) -> str | None:
    """Which TorchServe envelope (``service_envelope``) unwrapped ``data`` before us, if any.

    TorchServe's own rows are dicts of form fields: ``body`` for a plain body, bytes for a
    multipart file. Its envelopes hand over the first request's instances instead: strings
    or ``{"data": "<base64>"}`` (v1), ``{"name", "datatype", "data"}`` dicts (v2).
    """
    if not data:
        return None
    if all(isinstance(r, dict) and "datatype" in r and "name" in r for r in data):
        return TS_ENVELOPE_V2
    torchserve_rows = all(
        isinstance(r, dict) and ("body" in r or any(isinstance(v, (bytes, bytearray)) for v in r.values()))
        for r in data
    )
    return None if torchserve_rows and len(data) == n_requests else TS_ENVELOPE_V1


def _request_top_k(body: dict) -> int | None:
    parameters = body.get("parameters") if isinstance(body.get("parameters"), dict) else {}
    return _parse_top_k(next((src[k] for src in (body, parameters) for k in TOP_K_KEYS if k in src), None))


def _v2_strings(data: object, name: str) -> list[str]:
    """The base64 strings of one v2 BYTES input, whatever its shape ([n] or [n, 1])."""
    flat: list[object] = []
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        else:
            flat.append(item)
    if not flat or not all(isinstance(x, str) for x in flat):
        raise InputError(f'input "{name}": "data" must hold base64 image strings (datatype BYTES)')
    return flat  # type: ignore[return-value]


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
        manifest_name = ((getattr(context, "manifest", None) or {}).get("model") or {}).get("modelName")
        self.model_name = str(manifest_name or getattr(context, "model_name", None) or self.model_name)
        self.model = load_torchscript(os.path.join(model_dir, MODEL_FILE), self.device)
        check_outputs(self.model, len(self.labels), self.config.input_size, self.device)
        log.info("fruit model %s on %s: %d classes, input %dpx, %d threads", self.model_version, self.device,
                 len(self.labels), self.config.input_size, torch.get_num_threads())
        self.initialized = True


    def preprocess(self, data: list) -> list[Parsed]:
        envelope = ts_envelope(data, self._n_requests(len(data)))
        parsed = []
        for idx, row in enumerate(data):
            header_k = None
            try:
                if envelope is None:
                    header_k = _parse_top_k(self._header(idx, TOP_K_HEADER))
                parsed.append(self._parse(row, header_k, envelope))
            except InputError as exc:
                parsed.append(Parsed([], envelope, error=exc))
        return parsed

    def _parse(self, row: object, header_k: int | None, envelope: str | None) -> Parsed:
        if envelope == TS_ENVELOPE_V2:  # TorchServe kept only the first string of the input's data
            return Parsed([self._decode(row.get("data"), None)], envelope)
        if envelope == TS_ENVELOPE_V1:
            return Parsed([self._decode(row, None)], envelope)
        body = json_body(row)
        protocol = kserve_protocol(body)
        if protocol == KSERVE_V1:
            instances = body["instances"]
            if not isinstance(instances, list) or not instances:
                raise InputError('"instances" must be a non-empty list of images')
            k = _request_top_k(body) or header_k
            return Parsed([self._decode(instance, k) for instance in instances], protocol)
        if protocol == KSERVE_V2:
            inputs = body["inputs"]
            if not isinstance(inputs, list) or not inputs or not all(isinstance(i, dict) for i in inputs):
                raise InputError('"inputs" must be a non-empty list of {"name", "shape", "datatype", "data"}')
            k = _request_top_k(body) or header_k
            items, outputs = [], []
            for n, tensor in enumerate(inputs):
                name = str(tensor.get("name") or f"input-{n}")
                if tensor.get("datatype") != "BYTES":
                    raise InputError(f'input "{name}": datatype must be BYTES (base64 images), '
                                     f'got {tensor.get("datatype")!r}')
                input_k = _request_top_k(tensor) or k
                images = _v2_strings(tensor.get("data"), name)
                items += [self._decode(image, input_k) for image in images]
                outputs.append((name, len(images)))
            request_id = body.get("id")
            return Parsed(items, protocol, str(request_id) if request_id else None, outputs)
        return Parsed([self._decode(body if body is not None else row, header_k)])

    def _decode(self, value: object, default_k: int | None) -> Decoded:
        """One image; its error stays in its own slot, so the other images of a request are still scored."""
        try:
            payload, k = extract_payload(value)
            tensor = load_uint8(payload, self.config)
        except InputError as exc:
            return Decoded(None, 1, exc)
        return Decoded(tensor, clamp_top_k(k or default_k, len(self.labels), self.default_top_k))

    def inference(self, batch: torch.Tensor) -> torch.Tensor:
        """One forward pass for every valid image of the server-side batch."""
        with torch.inference_mode():
            inputs = normalize(batch.to(self.device, non_blocking=True), self.config.mean, self.config.std)
            with torch.autocast("cuda", enabled=self.device.type == "cuda"):
                return self.model(inputs)

    def postprocess(self, logits: torch.Tensor, parsed: list[Parsed]) -> list[dict | str]:
        ok = [d for p in parsed for d in p.items if d.error is None]
        predictions = iter(format_predictions(probabilities(logits), self.labels, [d.top_k for d in ok],
                                              self.model_version)) if ok else iter(())
        responses: list[dict | str] = []
        for idx, request in enumerate(parsed):
            answers = [next(predictions) if d.error is None else d.error.to_dict() for d in request.items]
            responses.append(self._answer(idx, request, answers))
        return responses

    def _answer(self, idx: int, request: Parsed, answers: list[dict]) -> dict | str:
        envelope = request.protocol in (TS_ENVELOPE_V1, TS_ENVELOPE_V2)
        if not envelope:
            self._set_json(idx)
        if request.error is not None or request.protocol is None:
            error = request.error or request.items[0].error
            body = request.error.to_dict() if request.error is not None else answers[0]
            if error is not None and not envelope:
                # Under TorchServe's envelope a row is an instance, not a request: its status is not ours to set.
                self._set_status(idx, error)
            return json.dumps(body) if request.protocol == TS_ENVELOPE_V2 else body
        if request.protocol == TS_ENVELOPE_V1:
            return answers[0]  # TorchServe wraps the list in {"predictions": [...]}
        if request.protocol == TS_ENVELOPE_V2:
            return json.dumps(answers[0])  # BYTES data are strings; TorchServe wraps it in an output
        if request.protocol == KSERVE_V1:
            return {"predictions": answers}
        outputs, start = [], 0
        for name, count in request.outputs:
            data = [json.dumps(a) for a in answers[start:start + count]]
            outputs.append({"name": name, "shape": [count], "datatype": "BYTES", "data": data})
            start += count
        return {"id": request.request_id or self._request_id(idx), "model_name": self.model_name,
                "model_version": self.model_version, "outputs": outputs}

    def handle(self, data: list, context) -> list[dict | str]:
        self.context = context
        start = time.perf_counter()
        parsed = self.preprocess(data)
        valid = [d.tensor for p in parsed for d in p.items if d.tensor is not None]
        logits = self.inference(torch.stack(valid)) if valid else torch.empty(0, len(self.labels))
        responses = self.postprocess(logits, parsed)
        metrics = getattr(context, "metrics", None)
        if metrics is not None:
            metrics.add_time("HandlerTime", round((time.perf_counter() - start) * 1000, 2), None, "ms")
        return responses

    def _n_requests(self, default: int) -> int:
        request_ids = getattr(self.context, "request_ids", None) if self.context is not None else None
        return len(request_ids) if request_ids else default

    def _request_id(self, idx: int) -> str | None:
        request_ids = getattr(self.context, "request_ids", None) or {}
        return request_ids.get(idx)

    def _header(self, idx: int, name: str) -> str | None:
        if self.context is None or idx >= len(getattr(self.context, "request_ids", {}) or {}):
            return None
        return self.context.get_request_header(idx, name) or self.context.get_request_header(idx, name.lower())

    def _set_status(self, idx: int, error: InputError) -> None:
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
