"""Fast checks of request parsing and answer formatting (handler/protocols.py), and of FruitHandler.handle with a
tiny model and a fake context: no torchserve, no trained model."""

from __future__ import annotations

import base64
import io
import json

import pytest
import torch
from fruitserve.handler import fruit_handler
from fruitserve.handler.classifier import Classifier
from fruitserve.handler.errors import InputError, TooManyImages
from fruitserve.handler.fruit_handler import FruitHandler, configured_envelope
from fruitserve.handler.preprocessing import PreprocessConfig
from fruitserve.handler.protocols import (
    KSERVE_V1,
    KSERVE_V2,
    Parsed,
    b64decode,
    extract_payload,
    format_answer,
    json_body,
    kserve_protocol,
    load_json,
    parse_request,
    parse_top_k,
)
from PIL import Image

LABELS = ["Apple", "Banana", "Kiwi", "Lime"]


def png(colour: tuple[int, int, int] = (120, 200, 40), size: int = 12) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, "PNG")
    return buffer.getvalue()


def b64(payload: bytes) -> str:
    return base64.b64encode(payload).decode()


def nested(depth: int) -> str:
    return '{"data": ' + "[" * depth + '"x"' + "]" * depth + "}"


# --- which protocol a body speaks ------------------------------------------------------------------------


@pytest.mark.parametrize(("body", "protocol"), [
    ({"instances": ["x"]}, KSERVE_V1),
    ({"instances": []}, KSERVE_V1),  # still v1: answered 400 as an empty v1 request
    ({"inputs": [{"name": "a"}]}, KSERVE_V2),
    ({"data": "x", "inputs": "cam-3"}, None),  # a plain request with an extra field
    ({"data": "x", "instances": ["y"]}, None),  # a payload key wins
    ({"image": "x", "inputs": [{"name": "a"}]}, None),
    ({"instances": "x"}, None),  # not a list
    ({"inputs": ["x"]}, None),  # not a list of tensor objects
    ({"inputs": []}, None),
    (None, None),
])
def test_kserve_protocol_rule(body: dict | None, protocol: str | None):
    assert kserve_protocol(body) == protocol


def test_plain_body_with_inputs_field_is_a_plain_request():
    row = {"body": {"data": b64(png()), "inputs": "cam-3", "top_k": 2}}
    plan = parse_request(row)
    assert plan.protocol is None and plan.images == [(row, None)]
    payload, k = extract_payload(plan.images[0][0])
    assert payload == png() and k == 2


def test_instances_on_predictions_path_keep_their_plain_shape():
    row = {"body": {"instances": [b64(png())], "top_k": 3}}
    plain = parse_request(row, plain_path=True)
    assert plain.protocol is None
    assert extract_payload(plain.images[0][0]) == (png(), 3)
    assert parse_request(row).protocol == KSERVE_V1  # on TorchServe's KServe routes it is v1


def test_row_level_top_k_passes_through_for_form_fields_and_json():
    form = {"data": png(), "top_k": b"2"}  # multipart: file and a text field
    plan = parse_request(form, header_k=4)
    assert plan.images == [(form, 4)] and extract_payload(form) == (png(), 2)
    text = json.dumps({"data": b64(png()), "k": 3})  # JSON sent as text/plain arrives as str
    assert extract_payload(parse_request({"body": text}).images[0][0]) == (png(), 3)


def test_kserve_top_k_precedence():
    body = {"instances": [{"data": "a", "top_k": 1}, "b"], "parameters": {"top_k": 2}}
    plan = parse_request({"body": body}, header_k=4)
    assert [k for _, k in plan.images] == [2, 2]  # request-level k is the default of each instance
    assert extract_payload({"data": b64(png()), "top_k": 1})[1] == 1  # an instance's own k wins when decoded


# --- base64, top_k, JSON safety ---------------------------------------------------------------------------


def test_base64_with_line_breaks_is_accepted():
    payload = png(size=64)
    text = b64(payload)
    wrapped = "\n".join(text[i:i + 76] for i in range(0, len(text), 76)) + "\n"
    assert "\n" in wrapped.strip()
    assert b64decode(wrapped) == payload
    assert b64decode("data:image/png;base64," + wrapped.replace("\n", "\r\n")) == payload
    assert b64decode("  " + wrapped.replace("\n", " \n\t")) == payload  # trailing blanks of each line too
    with pytest.raises(InputError, match="base64"):
        b64decode(wrapped + "*")  # still validated
    with pytest.raises(InputError, match="base64"):
        b64decode("this is not a fruit\n" * 20)  # prose: the spaces inside a line are not wrapping


@pytest.mark.parametrize("value", ["0", -1, "lots", True, [3], {"k": 3}, 2.5])
def test_bad_top_k_is_400(value: object):
    with pytest.raises(InputError) as info:
        parse_top_k(value)
    assert info.value.status == 400


def test_top_k_accepts_text_and_bytes():
    assert parse_top_k(" 3 ") == 3 and parse_top_k(b"2") == 2 and parse_top_k(4) == 4 and parse_top_k(None) is None


@pytest.mark.parametrize("depth", [40, 900, 100_000])
def test_deeply_nested_json_text_is_400(depth: int):
    with pytest.raises(InputError) as info:
        parse_request({"body": nested(depth).encode()})
    assert info.value.status == 400 and "nested" in str(info.value)


def test_deeply_nested_parsed_json_is_400_not_recursion_error():
    # TorchServe parses application/json itself: a few hundred levels arrive as a dict
    value: object = "x"
    for _ in range(800):
        value = {"data": value}
    with pytest.raises(InputError, match="nested"):
        parse_request({"body": value})
    deep_k: object = 3
    for _ in range(800):
        deep_k = [deep_k]
    with pytest.raises(InputError, match="nested"):
        parse_request({"body": {"data": "x", "top_k": deep_k}})


def test_json_in_json_strings_is_bounded():
    text = json.dumps({"data": b64(png())})
    for _ in range(12):
        text = json.dumps({"data": text})
    with pytest.raises(InputError, match="wrapped"):
        extract_payload(text)


def test_load_json_and_json_body():
    assert load_json(b'  {"a": 1}') == {"a": 1}
    assert load_json("not json") is None and load_json(b"{broken") is None and load_json(b"\xff\xd8") is None
    assert json_body({"body": '{"instances": []}'}) == {"instances": []}
    assert json_body({"file": b'{"instances": []}'}) is None  # only the body is the request's JSON


# --- limits and v2 checks ---------------------------------------------------------------------------------


def test_too_many_images_is_413_for_v1_and_v2():
    with pytest.raises(TooManyImages) as info:
        parse_request({"body": {"instances": ["x"] * 5}}, max_images=4)
    assert info.value.status == 413
    parse_request({"body": {"instances": ["x"] * 4}}, max_images=4)
    inputs = [{"name": n, "shape": [3], "datatype": "BYTES", "data": ["x"] * 3} for n in ("a", "b")]
    with pytest.raises(TooManyImages):
        parse_request({"body": {"inputs": inputs}}, max_images=5)
    assert len(parse_request({"body": {"inputs": inputs}}, max_images=6).images) == 6


def test_a_huge_v2_input_stops_counting_at_the_limit():
    body = {"inputs": [{"name": "a", "shape": [200_000], "datatype": "BYTES", "data": ["x"] * 200_000}]}
    with pytest.raises(TooManyImages):
        parse_request({"body": body}, max_images=32)


@pytest.mark.parametrize(("shape", "ok"), [([2], True), ([2, 1], True), ([1, 2], True), ([3], False), ([1], False),
                                           (None, False), ("2", False), ([2, "1"], False), ([], False)])
def test_v2_shape_must_match_data(shape: object, ok: bool):
    tensor = {"name": "image", "datatype": "BYTES", "data": [["a"], ["b"]]}
    if shape is not None:
        tensor["shape"] = shape
    body = {"inputs": [tensor]}
    if ok:
        assert parse_request({"body": body}).outputs == [("image", 2)]
    else:
        with pytest.raises(InputError, match="shape") as info:
            parse_request({"body": body})
        assert info.value.status == 400


def test_v2_id_is_echoed_or_left_out():
    answers = [{"label": "Lime"}]
    plan = parse_request({"body": {"inputs": [{"name": "i", "shape": [1], "datatype": "BYTES", "data": ["x"]}]}})
    assert plan.request_id is None
    request = Parsed([], KSERVE_V2, plan.request_id, plan.outputs)
    kwargs = {"model_name": "fruit", "model_version": "1"}
    assert "id" not in format_answer(request, answers, **kwargs)
    assert format_answer(request, answers, fallback_id="ts-7", **kwargs)["id"] == "ts-7"
    with_empty_id = Parsed([], KSERVE_V2, "", plan.outputs)
    assert format_answer(with_empty_id, answers, fallback_id="ts-7", **kwargs)["id"] == ""
    with pytest.raises(InputError, match="id"):
        parse_request({"body": {"id": 42, "inputs": [{"name": "i", "shape": [1], "datatype": "BYTES",
                                                        "data": ["x"]}]}})


def test_format_answer_shapes():
    answer = {"label": "Lime"}
    error = InputError("bad")
    names = {"model_name": "f", "model_version": "1"}
    assert format_answer(Parsed([]), [answer], **names) == answer
    assert format_answer(Parsed([], KSERVE_V1), [answer, answer], **names) == {"predictions": [answer, answer]}
    assert format_answer(Parsed([], KSERVE_V1, error=error), [], **names) == error.to_dict()
    v2 = format_answer(Parsed([], KSERVE_V2, "r", [("a", 2), ("b", 1)]), [answer, answer, answer], **names)
    assert [(o["name"], o["shape"], len(o["data"])) for o in v2["outputs"]] == [("a", [2], 2), ("b", [1], 1)]
    assert json.loads(v2["outputs"][1]["data"][0]) == answer


# --- FruitHandler.handle with a tiny model and a fake context ---------------------------------------------


class FakeContext:
    """Records what the handler sets per request, like ts.context.Context does."""

    def __init__(self, headers: list[dict[str, str]]) -> None:
        self.request_ids = {i: f"req-{i}" for i in range(len(headers))}
        self.headers = headers
        self.status: dict[int, int] = {}
        self.content_type: dict[int, str] = {}
        self.metrics = None
        self.manifest = {"model": {"modelName": "fruit", "modelVersion": "1"}}

    def get_request_header(self, idx: int, key: str) -> str | None:
        return self.headers[idx].get(key)

    def get_request_id(self, idx: int = 0) -> str | None:
        return self.request_ids.get(idx)

    def set_response_status(self, code: int = 200, phrase: str = "", idx: int = 0) -> None:
        self.status[idx] = code

    def set_response_content_type(self, idx: int, value: str) -> None:
        self.content_type[idx] = value


class CountingGraph(torch.nn.Module):
    """Stands in for the inference graph: uint8 images -> (logits, features), counting the batches it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[int] = []

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.batches.append(x.shape[0])
        mean = x.float().mean(dim=(2, 3)) / 255  # N x 3
        return torch.cat([mean, mean[:, :1] * 0.5], dim=1), mean  # N x 4 classes


@pytest.fixture
def handler() -> FruitHandler:
    h = FruitHandler()
    config = PreprocessConfig(16, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    h.classifier = Classifier(CountingGraph(), LABELS, config, model_version="1", max_batch=4)
    h.max_images = 8
    h.initialized = True
    return h


def test_mixed_batch_each_request_answered_on_its_own(handler: FruitHandler):
    image = png()
    data = [
        {},  # an empty form post
        {"data": json.dumps({"note": "a JSON file sent as a form field"})},  # multipart text part: arrives as str
        {"body": image},  # raw upload with X-Top-K
        {"body": {"instances": [b64(image), "***"]}},  # KServe v1 on its route
        {"body": {"data": b64(image), "inputs": "cam-3", "top_k": 2}},  # plain, with an extra field
        {"body": {"instances": [b64(image)]}},  # on /predictions: plain, as before KServe
        {"file": {"d": "x"}},  # a multipart part sent as JSON: arrives as a dict
    ]
    headers = [{"url_path": ""}, {"url_path": ""}, {"url_path": "", "X-Top-K": "3"}, {}, {"url_path": ""},
               {"url_path": ""}, {"url_path": ""}]
    context = FakeContext(headers)
    out = handler.handle(data, context)
    assert len(out) == len(data)
    assert context.content_type == {i: "application/json" for i in range(len(data))}
    assert context.status == {0: 400, 1: 400, 6: 400}
    assert out[0]["code"] == 400 and "no image" in out[0]["error"]
    assert len(out[2]["top_k"]) == 3 and out[2]["label"] in LABELS
    assert [len(p.get("top_k", [])) for p in out[3]["predictions"]] == [len(LABELS), 0]  # default 5, 4 classes
    assert out[3]["predictions"][1]["code"] == 400
    assert len(out[4]["top_k"]) == 2
    assert "predictions" not in out[5] and out[5]["label"] in LABELS


def test_too_many_images_is_413_for_that_request_only(handler: FruitHandler):
    image = b64(png())
    data = [{"body": {"instances": [image] * 9}}, {"body": {"instances": [image] * 8}}, {"body": png()}]
    context = FakeContext([{}, {}, {"url_path": ""}])
    out = handler.handle(data, context)
    assert context.status == {0: 413}
    assert out[0]["code"] == 413 and len(out[1]["predictions"]) == 8 and out[2]["label"]
    batches = handler.classifier.graph.batches
    assert max(batches) <= handler.classifier.max_batch and sum(batches) == 9


def test_unexpected_error_is_500_for_that_request_only(handler: FruitHandler, monkeypatch: pytest.MonkeyPatch):
    real = fruit_handler.load_uint8

    def flaky(payload: bytes, config: PreprocessConfig) -> torch.Tensor:
        if payload == png((1, 2, 3)):
            raise RuntimeError("decoder bug")
        return real(payload, config)

    monkeypatch.setattr(fruit_handler, "load_uint8", flaky)
    data = [{"body": png((1, 2, 3))}, {"body": png()}, {"body": nested(100_000).encode()}]
    context = FakeContext([{"url_path": ""}] * 3)
    out = handler.handle(data, context)
    assert context.status == {0: 500, 2: 400}
    assert out[0]["code"] == 500 and out[1]["label"] in LABELS and "nested" in out[2]["error"]


def test_an_envelope_is_refused_at_initialize(handler: FruitHandler):
    """TorchServe 0.12's ModelLoader.load wraps handle() in the envelope, then calls initialize() with it in scope."""

    def load(envelope: str | None) -> None:  # the shape of ts.model_loader.TsModelLoader.load
        handler.initialize(context=None)

    with pytest.raises(RuntimeError, match="remove service_envelope"):
        load("kserve")
    with pytest.raises(RuntimeError, match="service_envelope=kservev2"):
        load("kservev2")

    def outer() -> str | None:  # called any other way, there is no envelope to find
        return configured_envelope()

    assert outer() is None
