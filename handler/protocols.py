"""Reading one request (plain, KServe v1 or v2) and writing its answer: pure functions, no model, no TorchServe.

``parse_request`` turns what TorchServe hands the handler for one request into a ``Plan``: the
protocol its answer must speak and the raw image values to decode; ``extract_payload`` turns one
such value into image bytes; ``format_answer`` builds the answer from the per-image results. Every
malformed input raises ``InputError`` (with its HTTP status), never anything else, so one bad
request cannot fail the server-side batch it arrived in.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from dataclasses import dataclass, field

import torch
from fruitserve.handler.errors import InputError, RequestError, TooManyImages

PAYLOAD_KEYS = ("data", "body", "file", "image", "b64", "bytes")
TOP_K_KEYS = ("top_k", "topk", "k")

KSERVE_V1 = "kserve-v1"
KSERVE_V2 = "kserve-v2"

DEFAULT_MAX_IMAGES = 32
# No request needs more than a few levels ({"instances": [{"data": ...}]}); a limit far above that keeps every
# walk over client JSON short, whatever Python's recursion limit is.
MAX_JSON_DEPTH = 32
# extract_payload unwraps {"data": {"b64": [...]}}-style wrappers and JSON sent as text; real clients use one or two.
MAX_PAYLOAD_NESTING = 8


@dataclass
class Plan:
    """One request, parsed: what to decode and how to answer."""

    protocol: str | None  # None: a plain TorchServe request (one image, one JSON object back)
    images: list[tuple[object, int | None]]  # (raw image value, top_k asked for it) in answer order
    request_id: str | None = None  # KServe v2: the request's "id", echoed
    outputs: list[tuple[str, int]] = field(default_factory=list)  # KServe v2: (input name, images in it)


@dataclass
class Decoded:
    """One image of a request after preprocessing: a uint8 tensor to score, or the error to answer with."""

    tensor: torch.Tensor | None
    top_k: int
    error: RequestError | None = None


@dataclass
class Parsed:
    """One TorchServe request after parsing: its images, and the protocol its answer must speak.

    ``protocol`` is None for a plain TorchServe request (one image, one JSON object back).
    ``error`` is set when the request itself cannot be answered (not an image: e.g. a KServe body
    without a list of instances); its images are then never scored.
    """

    items: list[Decoded]
    protocol: str | None = None
    request_id: str | None = None
    outputs: list[tuple[str, int]] = field(default_factory=list)  # KServe v2: (input name, images in it)
    error: RequestError | None = None


# --- JSON -----------------------------------------------------------------------------------------------


def check_depth(value: object, limit: int = MAX_JSON_DEPTH) -> None:
    """Refuse JSON nested deeper than ``limit`` before anything recursive (repr, str, our parsing) touches it.

    Iterative on purpose: TorchServe parses ``application/json`` bodies before the handler sees them, so
    a body nested a few hundred levels deep arrives as a dict that a recursive walk could not finish.
    """
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth >= limit:
            raise InputError(f"JSON nested more than {limit} levels deep")
        stack.extend((child, depth + 1) for child in children)


def load_json(value: object) -> object | None:
    """``value`` parsed, when it is text (or bytes) holding a JSON object; None when it is not one.

    The one place the handler parses JSON: JSON sent as ``text/plain``, with a charset in its content type,
    inside a multipart field or without a content type reaches the handler unparsed.
    """
    if not isinstance(value, (bytes, bytearray, str)) or value[:64].lstrip()[:1] not in (b"{", "{"):
        return None
    try:
        parsed = json.loads(value)
    except RecursionError:  # the C parser refuses deep nesting with RecursionError, not ValueError
        raise InputError(f"JSON nested more than {MAX_JSON_DEPTH} levels deep") from None
    except (ValueError, UnicodeDecodeError):
        return None
    check_depth(parsed)
    return parsed


def json_body(row: object) -> dict | None:
    """The request's JSON object, if its body is one (parsed by TorchServe or still text)."""
    value = row
    if isinstance(row, dict):
        value = next((row[k] for k in ("body", "data") if row.get(k) is not None), None)
    if isinstance(value, dict):
        return value
    parsed = load_json(value)
    return parsed if isinstance(parsed, dict) else None


# --- which protocol -------------------------------------------------------------------------------------


def kserve_protocol(body: dict | None) -> str | None:
    """KServe v1/v2 when the body has that shape and nothing that makes it a plain request.

    A plain request may carry any extra field (``{"data": ..., "inputs": "cam-3"}``), so a payload key
    wins; only a list of instances (v1) or a list of tensor objects (v2) makes a body KServe.
    """
    if body is None or any(k in body for k in PAYLOAD_KEYS):
        return None
    if isinstance(body.get("instances"), list):
        return KSERVE_V1
    inputs = body.get("inputs")
    if isinstance(inputs, list) and inputs and all(isinstance(i, dict) for i in inputs):
        return KSERVE_V2
    return None


def parse_request(row: object, header_k: int | None = None, *, plain_path: bool = False,
                  max_images: int = DEFAULT_MAX_IMAGES) -> Plan:
    """What one TorchServe row asks for. ``plain_path``: it came on ``/predictions``, where bodies are never KServe.

    Raises ``InputError`` for a request that is malformed as a whole; a bad image is left for its own slot.
    """
    check_depth(row)
    body = None if plain_path else json_body(row)
    protocol = kserve_protocol(body)
    if protocol == KSERVE_V1:
        return _parse_v1(body, header_k, max_images)
    if protocol == KSERVE_V2:
        return _parse_v2(body, header_k, max_images)
    # plain: the row itself, so that form fields next to the file (top_k) are still read
    return Plan(None, [(_plain_instances(row) if plain_path else row, header_k)])


def _plain_instances(row: object) -> object:
    """Before KServe was spoken, ``instances`` was one more payload key on ``/predictions``; it still is there."""
    body = json_body(row)
    if body is not None and not any(k in body for k in PAYLOAD_KEYS) and "instances" in body:
        return {"data": body["instances"]} | {k: body[k] for k in TOP_K_KEYS if k in body}
    return row


def _parse_v1(body: dict, header_k: int | None, max_images: int) -> Plan:
    instances = body["instances"]
    if not instances:
        raise InputError('"instances" must be a non-empty list of images')
    _check_count(len(instances), max_images)
    k = request_top_k(body) or header_k
    return Plan(KSERVE_V1, [(instance, k) for instance in instances])


def _parse_v2(body: dict, header_k: int | None, max_images: int) -> Plan:
    request_id = body.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InputError('"id" must be a string')
    k = request_top_k(body) or header_k
    images: list[tuple[object, int | None]] = []
    outputs = []
    for n, tensor in enumerate(body["inputs"]):
        name = tensor.get("name")
        if name is None:
            name = f"input-{n}"
        elif not isinstance(name, str):
            raise InputError(f'input {n}: "name" must be a string')
        if tensor.get("datatype") != "BYTES":
            raise InputError(f'input "{name}": datatype must be BYTES (base64 images), '
                             f'got {_short(tensor.get("datatype"))}')
        strings = _v2_strings(tensor.get("data"), name, max_images - len(images), max_images)
        _check_shape(tensor.get("shape"), len(strings), name)
        input_k = request_top_k(tensor) or k
        images += [(s, input_k) for s in strings]
        outputs.append((name, len(strings)))
    return Plan(KSERVE_V2, images, request_id, outputs)


def _check_count(n: int, max_images: int) -> None:
    if n > max_images:
        raise TooManyImages(f"{n} images in one request, more than {max_images}: split it into several "
                            "requests (the server batches them itself)")


def _check_shape(shape: object, n: int, name: str) -> None:
    if not isinstance(shape, list) or not shape or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise InputError(f'input "{name}": "shape" must be a list of non-negative integers, got {_short(shape)}')
    product = math.prod(shape)
    if product != n:
        raise InputError(f'input "{name}": "shape" {shape} holds {product} elements, "data" holds {n}')


def _v2_strings(data: object, name: str, room: int, max_images: int) -> list[str]:
    """The base64 strings of one v2 BYTES input, whatever its nesting ([n] or [n, 1]); at most ``room`` of them."""
    flat: list[str] = []
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        elif isinstance(item, str):
            flat.append(item)
            if len(flat) > room:  # stop here: a 20 MiB request can hold ~200k tiny images
                _check_count(max_images - room + len(flat), max_images)
        else:
            raise InputError(f'input "{name}": "data" must hold base64 image strings (datatype BYTES)')
    if not flat:
        raise InputError(f'input "{name}": "data" must hold base64 image strings (datatype BYTES)')
    return flat


# --- one image ------------------------------------------------------------------------------------------


def extract_payload(value: object, depth: int = 0) -> tuple[bytes, int | None]:
    """Image bytes (and a requested top-k, if any) from one image value of a request.

    Raw bodies arrive as bytes; multipart uploads as bytes under the form field's name;
    ``application/json`` bodies already parsed, with the image base64-encoded.
    """
    if depth > MAX_PAYLOAD_NESTING:
        raise InputError(f"the image is wrapped more than {MAX_PAYLOAD_NESTING} levels deep")
    top_k = None
    if isinstance(value, dict):
        top_k = parse_top_k(next((value[k] for k in TOP_K_KEYS if k in value), None))
        inner = next((value[k] for k in PAYLOAD_KEYS if value.get(k) is not None), None)
        if inner is None:  # multipart with an unusual field name: take the one file-like value
            inner = next((v for v in value.values() if isinstance(v, (bytes, bytearray))), None)
        if inner is None:
            raise InputError("no image in the request: send the image bytes as the body, a multipart file, "
                             'or JSON {"data": "<base64>"}')
        if isinstance(inner, dict) or (isinstance(inner, list) and inner):
            payload, inner_k = extract_payload(inner if isinstance(inner, dict) else _one_image(inner), depth + 1)
            return payload, inner_k if inner_k is not None else top_k
        value = inner
    if isinstance(value, (bytes, bytearray, str)):
        parsed = load_json(value)  # JSON sent as text/plain or without a content type arrives unparsed
        if isinstance(parsed, dict):
            payload, inner_k = extract_payload(parsed, depth + 1)
            return payload, inner_k if inner_k is not None else top_k
        if isinstance(value, str):
            return b64decode(value), top_k
        return bytes(value), top_k
    if isinstance(value, list):
        return extract_payload(_one_image(value), depth + 1)
    raise InputError(f"unsupported request payload of type {type(value).__name__}")


def _one_image(items: list) -> object:
    if len(items) != 1:
        raise InputError(f"send one image per request (got a list of {len(items)}); TorchServe batches requests itself")
    return items[0]


def b64decode(text: str) -> bytes:
    """Strict base64, but wrapped lines allowed: ``base64`` and MIME encoders break lines at 76 columns.

    Only line breaks (and whitespace around the text) are dropped: spaces inside are still refused, so
    prose sent by mistake ("this is not a fruit") stays a 400 rather than decoding to junk bytes.
    """
    if text.startswith("data:") and "," in text:  # data URL
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode("".join(line.strip() for line in text.strip().splitlines()), validate=True)
    except (binascii.Error, ValueError):
        raise InputError("the image string is not valid base64") from None


def parse_top_k(value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray)):
        value = value.decode("utf-8", "replace")
    # only scalars: str() of a client's list or dict could be arbitrarily large
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise InputError(f"top_k must be a positive integer, got a {type(value).__name__}")
    try:
        k = int(value.strip()[:20] if isinstance(value, str) else value)
    except ValueError:
        raise InputError(f"top_k must be a positive integer, got {_short(value)}") from None
    if k < 1:
        raise InputError(f"top_k must be a positive integer, got {k}")
    return k


def request_top_k(body: dict) -> int | None:
    """``top_k`` of a KServe request or v2 input, directly or under ``parameters``."""
    parameters = body.get("parameters") if isinstance(body.get("parameters"), dict) else {}
    return parse_top_k(next((src[k] for src in (body, parameters) for k in TOP_K_KEYS if k in src), None))


def _short(value: object) -> str:
    text = repr(value) if isinstance(value, (str, int, float, bool, type(None))) else type(value).__name__
    return text if len(text) <= 40 else text[:37] + "..."


# --- the answer -----------------------------------------------------------------------------------------


def format_answer(request: Parsed, answers: list[dict], *, model_name: str, model_version: str | None,
                  fallback_id: str | None = None) -> dict:
    """The body of ``request``'s answer: ``answers`` holds one prediction or error object per image of it.

    A request refused as a whole (``request.error``) answers with that error, whatever its protocol;
    ``fallback_id`` is a v2 answer's ``id`` when the request sent none.
    """
    if request.error is not None:
        return request.error.to_dict()
    if request.protocol is None:
        return answers[0]
    if request.protocol == KSERVE_V1:
        return {"predictions": answers}
    v2_outputs, start = [], 0
    for name, count in request.outputs:
        data = [json.dumps(a) for a in answers[start:start + count]]
        v2_outputs.append({"name": name, "shape": [count], "datatype": "BYTES", "data": data})
        start += count
    answer: dict = {"model_name": model_name, "model_version": model_version, "outputs": v2_outputs}
    request_id = request.request_id if request.request_id is not None else fallback_id
    if request_id is not None:  # v2's "id" is an optional string: absent, never null
        answer = {"id": request_id} | answer
    return answer
