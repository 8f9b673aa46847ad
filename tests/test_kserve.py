"""KServe v1/v2 protocols against real torchserve servers, and ``fruit-batch --protocol kserve-v1|kserve-v2``.

The deployed KServe set-up (``deploy/kserve/config/config.properties``: no TorchServe envelope, the handler
speaks v1/v2 itself, ``batchSize`` 32), and a server configured with TorchServe's own envelope, which the
handler refuses at start-up (see the handler's docstring).
"""

from __future__ import annotations

import base64
import csv
import io
import json
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
import requests
from click.testing import CliRunner
from conftest import jpeg_bytes, local_http_server, read_csv, wait_until
from fruitserve.batch.cli import main as batch_main
from fruitserve.model_store.torchserve_process import TorchServe, _read_properties
from fruitserve.train.synthetic import CLASSES
from PIL import Image

pytestmark = pytest.mark.server
TIMEOUT = 60
ROOT = Path(__file__).resolve().parents[1]
KSERVE_CONFIG = ROOT / "deploy" / "kserve" / "config" / "config.properties"
# what the deployed config decides about serving; addresses, ports and the model store are the test's own
SERVING_KEYS = ("model_snapshot", "service_envelope", "max_request_size", "max_response_size",
                "default_response_timeout", "job_queue_size", "number_of_netty_threads", "netty_client_threads")


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (1, 1), (100, 200, 50)).save(buffer, "PNG")
    return buffer.getvalue()


def b64(payload: bytes) -> str:
    return base64.b64encode(payload).decode()


def images(n: int, seed: int = 0) -> list[bytes]:
    names = sorted(CLASSES)
    return [jpeg_bytes(names[i % len(names)], seed=seed + i) for i in range(n)]


@pytest.fixture(scope="module")
def deployed(model_store: Path, tmp_path_factory: pytest.TempPathFactory):
    """TorchServe as the KServe config runs it: tokens off, its model snapshot and envelope setting."""
    config = _read_properties(KSERVE_CONFIG)
    extra = {k: config[k] for k in SERVING_KEYS if k in config}
    ts = TorchServe(workdir=tmp_path_factory.mktemp("ts_kserve"), model_store=model_store, token_auth=False,
                    extra_config=extra)
    ts.start()
    try:
        yield ts
    finally:
        ts.stop()


def plain(ts: TorchServe, payload: bytes) -> dict:
    response = requests.post(f"{ts.inference_url}/predictions/fruit", data=payload, timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    return response.json()


def v1(ts: TorchServe, instances: list, **extra) -> requests.Response:
    return requests.post(f"{ts.inference_url}/v1/models/fruit:predict", json={"instances": instances} | extra,
                         timeout=TIMEOUT)


def v2_request(*inputs: list[str], request_id: str | None = None) -> dict:
    body: dict = {"inputs": [{"name": f"image-{i}", "shape": [len(data)], "datatype": "BYTES", "data": data}
                             for i, data in enumerate(inputs)]}
    if request_id:
        body["id"] = request_id
    return body


def v2(ts: TorchServe, body: dict) -> requests.Response:
    return requests.post(f"{ts.inference_url}/v2/models/fruit/infer", json=body, timeout=TIMEOUT)


def same(served: dict, expected: dict) -> None:
    assert served["label"] == expected["label"] and served["model_version"] == expected["model_version"]
    n = len(served["top_k"])  # the request may ask for fewer classes than the reference
    assert [t["label"] for t in served["top_k"]] == [t["label"] for t in expected["top_k"][:n]]
    assert served["confidence"] == pytest.approx(expected["confidence"], abs=1e-5)


def batches_so_far(ts: TorchServe) -> int:
    """Server-side batches the worker has run (it logs one line per batch)."""
    log = ts.workdir / "logs" / "model_log.log"
    return log.read_text(errors="replace").count("Backend received inference") if log.is_file() else 0


# --- the deployed set-up: the handler speaks KServe itself ---------------------------------------------


def test_deployed_config_leaves_the_protocol_to_the_handler():
    config = _read_properties(KSERVE_CONFIG)
    assert "service_envelope" not in config  # TorchServe's envelopes break batching (503 for the whole batch)
    snapshot = json.loads(config["model_snapshot"])["models"]["fruit"]
    assert next(iter(snapshot.values()))["batchSize"] > 1


def test_v1_single_instance_equals_plain_prediction(deployed: TorchServe):
    payload = jpeg_bytes("Lime", seed=11)
    response = v1(deployed, [{"data": b64(payload)}])
    assert response.status_code == 200 and response.headers["content-type"].startswith("application/json")
    (prediction,) = response.json()["predictions"]
    same(prediction, plain(deployed, payload))


def test_v2_single_input_equals_plain_prediction(deployed: TorchServe):
    payload = jpeg_bytes("Kiwi", seed=12)
    response = v2(deployed, v2_request([b64(payload)], request_id="req-42"))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["id"] == "req-42" and body["model_name"] == "fruit" and body["model_version"]
    (output,) = body["outputs"]
    assert output["name"] == "image-0" and output["datatype"] == "BYTES" and output["shape"] == [1]
    same(json.loads(output["data"][0]), plain(deployed, payload))


def test_multi_instance_v1_with_bad_instances(deployed: TorchServe):
    good = images(3, seed=20)
    instances = [{"data": b64(good[0])}, {"b64": b64(good[1])}, "***not base64***",
                 {"data": b64(b"plain text, not a picture")}, b64(good[2])]
    response = v1(deployed, instances)
    assert response.status_code == 200, response.text  # one bad image does not fail the others
    predictions = response.json()["predictions"]
    assert len(predictions) == len(instances)
    for served, payload in zip([predictions[0], predictions[1], predictions[4]], good, strict=True):
        same(served, plain(deployed, payload))
    assert predictions[2]["code"] == 400 and "base64" in predictions[2]["error"]
    assert predictions[3]["code"] == 415 and predictions[3]["error"]


def test_multi_image_v2_with_a_bad_image_and_top_k(deployed: TorchServe):
    good = images(3, seed=30)
    body = v2_request([b64(good[0]), "***not base64***", b64(good[1])], [b64(good[2])])
    body["parameters"] = {"top_k": 2}
    response = v2(deployed, body)
    assert response.status_code == 200, response.text
    first, second = response.json()["outputs"]
    assert first["shape"] == [3] and second["shape"] == [1] and second["name"] == "image-1"
    answers = [json.loads(d) for d in first["data"] + second["data"]]
    for served, payload in zip([answers[0], answers[2], answers[3]], good, strict=True):
        same(served, plain(deployed, payload))
        assert len(served["top_k"]) == 2
    assert answers[1]["code"] == 400


def test_malformed_kserve_requests_are_400(deployed: TorchServe):
    assert v1(deployed, []).status_code == 400
    assert v1(deployed, [b64(jpeg_bytes())], top_k="zero").status_code == 400
    tensor = {"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [0.5]}]}
    response = v2(deployed, tensor)
    assert response.status_code == 400 and "BYTES" in response.json()["error"]
    assert v2(deployed, {"inputs": "nothing"}).status_code == 400


def test_v2_shape_and_id(deployed: TorchServe):
    image = b64(jpeg_bytes("Lime", seed=13))
    wrong = {"inputs": [{"name": "image", "shape": [2], "datatype": "BYTES", "data": [image]}]}
    response = v2(deployed, wrong)
    assert response.status_code == 400 and "shape" in response.json()["error"]
    response = v2(deployed, v2_request([image]))  # no id: TorchServe's request id, never null
    assert response.status_code == 200 and isinstance(response.json()["id"], str) and response.json()["id"]


def test_wrapped_base64_is_accepted(deployed: TorchServe):
    payload = jpeg_bytes("Kiwi", seed=14)
    text = b64(payload)
    wrapped = "\n".join(text[i:i + 76] for i in range(0, len(text), 76)) + "\n"  # what `base64` prints
    response = v1(deployed, [{"data": wrapped}])
    assert response.status_code == 200, response.text
    same(response.json()["predictions"][0], plain(deployed, payload))


def test_plain_bodies_on_predictions_are_not_kserve(deployed: TorchServe):
    payload = jpeg_bytes("Banana", seed=15)
    url = f"{deployed.inference_url}/predictions/fruit"
    extra_field = requests.post(url, json={"data": b64(payload), "inputs": "cam-3", "top_k": 2}, timeout=TIMEOUT)
    assert extra_field.status_code == 200, extra_field.text
    same(extra_field.json(), plain(deployed, payload))
    assert len(extra_field.json()["top_k"]) == 2
    instances = requests.post(url, json={"instances": [b64(payload)]}, timeout=TIMEOUT)
    assert instances.status_code == 200 and "predictions" not in instances.json()  # the shape it always had
    same(instances.json(), plain(deployed, payload))
    form = requests.post(url, files={"data": ("a.jpg", payload, "image/jpeg")}, data={"top_k": "1"},
                         timeout=TIMEOUT)
    assert form.status_code == 200 and len(form.json()["top_k"]) == 1


def test_too_many_images_is_413_alone(deployed: TorchServe):
    image = b64(jpeg_bytes("Lime", seed=16))
    many = v1(deployed, [image] * 33)  # model-config.yaml: max_images_per_request 32
    assert many.status_code == 413 and many.json()["code"] == 413
    tiny = b64(png_bytes())
    assert v2(deployed, v2_request([tiny] * 5000)).status_code == 413
    assert len(v1(deployed, [image] * 32).json()["predictions"]) == 32


def test_deeply_nested_json_is_400_and_the_worker_lives(deployed: TorchServe):
    pids = deployed.worker_pids()
    body = b'{"instances": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    for path in ("/v1/models/fruit:predict", "/predictions/fruit"):
        response = requests.post(f"{deployed.inference_url}{path}", data=body,
                                 headers={"Content-Type": "application/json"}, timeout=TIMEOUT)
        assert response.status_code == 400 and "nested" in response.json()["error"], response.text
    assert deployed.worker_pids() == pids


def test_mixed_batch_keeps_each_requests_status_top_k_and_type(deployed: TorchServe):
    """Odd requests (an empty form, a multipart file sent as text or JSON) batched with normal ones: every
    request keeps its own status code, X-Top-K and content type (they once switched the batch's mode)."""
    payloads = images(8, seed=60)
    expected = [plain(deployed, p) for p in payloads]
    url = f"{deployed.inference_url}/predictions/fruit"
    before = batches_so_far(deployed)

    def call(i: int) -> tuple[str, requests.Response]:
        kind = ("empty_form", "text_file", "json_file", "top_k", "v1", "v2")[i % 6]
        p = payloads[i % len(payloads)]
        if kind == "empty_form":
            return kind, requests.post(url, data=b"", headers={"Content-Type": "application/x-www-form-urlencoded"},
                                       timeout=TIMEOUT)
        if kind == "text_file":
            return kind, requests.post(url, files={"data": ("a.txt", b"just text", "text/plain")}, timeout=TIMEOUT)
        if kind == "json_file":
            return kind, requests.post(url, files={"data": ("a.json", b'{"note": 1}', "application/json")},
                                       timeout=TIMEOUT)
        if kind == "top_k":
            return kind, requests.post(url, data=p, headers={"X-Top-K": "2"}, timeout=TIMEOUT)
        if kind == "v1":
            return kind, v1(deployed, [{"data": b64(p)}])
        return kind, v2(deployed, v2_request([b64(p)]))

    with ThreadPoolExecutor(max_workers=24) as pool:
        answers = list(pool.map(call, range(48)))
    for i, (kind, response) in enumerate(answers):
        assert response.headers["content-type"].startswith("application/json"), (kind, response.headers)
        reference = expected[i % len(payloads)]
        if kind in ("empty_form", "text_file", "json_file"):
            assert response.status_code in (400, 415) and response.json()["code"] == response.status_code, (
                kind, response.status_code, response.text)
        elif kind == "top_k":
            assert response.status_code == 200 and len(response.json()["top_k"]) == 2, response.text
            same(response.json(), reference)
        elif kind == "v1":
            same(response.json()["predictions"][0], reference)
        else:
            same(json.loads(response.json()["outputs"][0]["data"][0]), reference)
    assert batches_so_far(deployed) - before < len(answers)


def test_concurrent_v1_v2_and_plain_requests_share_server_batches(deployed: TorchServe):
    payloads = images(24, seed=40)
    expected = [plain(deployed, p) for p in payloads]
    before = batches_so_far(deployed)

    def call(i: int) -> dict:
        if i % 3 == 0:
            response = v1(deployed, [{"data": b64(payloads[i])}])
            return response.json()["predictions"][0] if response.status_code == 200 else {"status": response.status_code}
        if i % 3 == 1:
            response = v2(deployed, v2_request([b64(payloads[i])], request_id=f"r{i}"))
            if response.status_code != 200:
                return {"status": response.status_code}
            assert response.json()["id"] == f"r{i}"
            return json.loads(response.json()["outputs"][0]["data"][0])
        return plain(deployed, payloads[i])

    with ThreadPoolExecutor(max_workers=len(payloads)) as pool:
        answers = list(pool.map(call, range(len(payloads))))
    for answer, reference in zip(answers, expected, strict=True):
        same(answer, reference)
    # the point of the test: TorchServe put several of these requests in one batch, and each got its own answer
    assert batches_so_far(deployed) - before < len(payloads)


# --- TorchServe's own envelope is refused -----------------------------------------------------------------


def test_torchserve_envelope_is_refused_naming_the_setting(model_store: Path, tmp_path: Path):
    envelope = "kservev2"
    ts = TorchServe(workdir=tmp_path / "ts", model_store=model_store, token_auth=False,
                    extra_config={"service_envelope": envelope})
    ts.start(wait=False)
    log = ts.workdir / "logs" / "model_log.log"
    try:
        wait_until(lambda: log.is_file() and "remove service_envelope" in log.read_text(errors="replace"),
                   "the worker's refusal in model_log.log", timeout=180, interval=0.5)
        text = log.read_text(errors="replace")
        assert f"service_envelope={envelope} is set: remove service_envelope" in text
    finally:
        ts.stop()


# --- fruit-batch --protocol ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_folder(demo_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("kserve_batch")
    for class_dir in sorted((demo_data / "Test").iterdir())[:4]:
        target = root / class_dir.name
        target.mkdir()
        for image in sorted(class_dir.iterdir())[:3]:
            shutil.copy(image, target / image.name)
    (root / class_dir.name / "notes.png").write_bytes(b"text, not a picture")
    return root


def run_batch(folder: Path, out: Path, *args: str) -> dict[str, dict[str, str]]:
    result = CliRunner().invoke(batch_main, ["score", str(folder), str(out), "--quiet", "--timeout", "30",
                                             "--retries", "1", "--key-file", str(out.parent / "none.json"), *args])
    assert result.exit_code == 1, result.output  # every file scored except the one that is not an image
    with open(out, newline="", encoding="utf-8") as handle:
        return {row["path"]: row for row in csv.DictReader(handle)}


def test_fruit_batch_protocols_give_the_same_rows(small_folder: Path, deployed: TorchServe, model_store: Path,
                                                  tmp_path: Path):
    local = run_batch(small_folder, tmp_path / "local.csv", "--local", "--model", str(model_store / "fruit.mar"))
    for protocol in ("torchserve", "kserve-v1", "kserve-v2"):
        rows = run_batch(small_folder, tmp_path / f"{protocol}.csv", "--url", deployed.inference_url,
                         "--protocol", protocol, "--top-k", "2")
        assert list(rows) == list(local), protocol
        for path, row in rows.items():
            assert (row["status"], row["label"], row["error_code"]) == (
                local[path]["status"], local[path]["label"], local[path]["error_code"]), (protocol, path)
            if row["status"] == "ok":
                assert float(row["confidence"]) == pytest.approx(float(local[path]["confidence"]), abs=1e-4)
                assert len(json.loads(row["top_k"])) == 2
    assert rows[next(p for p in rows if p.endswith("notes.png"))]["error_code"] == "415"


def test_local_and_protocol_do_not_mix(small_folder: Path, tmp_path: Path):
    result = CliRunner().invoke(batch_main, ["score", str(small_folder), str(tmp_path / "x.csv"), "--local",
                                             "--protocol", "kserve-v1"])
    assert result.exit_code == 2 and "--local" in result.output


# --- fruit-batch against a scripted server: retries, wrong model, malformed answers ----------------------


class Scripted(BaseHTTPRequestHandler):
    """Answers GETs with ``ready`` and POSTs from ``answers`` in turn (the last one repeats)."""

    ready: tuple[int, bytes] = (200, b'{"name": "fruit", "ready": true}')
    answers: list[tuple[int, bytes]] = []
    posts: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._send(*self.ready)

    def do_POST(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers["Content-Length"]))
        type(self).posts.append(self.path)
        self._send(*self.answers[min(len(self.posts), len(self.answers)) - 1])

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def scripted() -> Iterator[str]:
    Scripted.ready, Scripted.answers, Scripted.posts = (200, b"{}"), [], []
    with local_http_server(Scripted) as url:
        yield url


def score_one_file(url: str, tmp_path: Path, *args: str) -> tuple[int, str, list[dict[str, str]]]:
    folder = tmp_path / "in"
    folder.mkdir(exist_ok=True)
    (folder / "a.jpg").write_bytes(jpeg_bytes())
    out = tmp_path / "out.csv"
    result = CliRunner().invoke(batch_main, ["score", str(folder), str(out), "--quiet", "--url", url, "--retries", "2",
                                             "--key-file", str(tmp_path / "none.json"), *args])
    rows = read_csv(out) if out.is_file() else []
    return result.exit_code, result.output, rows


GOOD_PLAIN = json.dumps({"label": "Lime", "confidence": 0.9, "top_k": [{"label": "Lime", "probability": 0.9}],
                         "model_version": "1"}).encode()
GOOD_V1 = json.dumps({"predictions": [{"label": "Lime", "confidence": 0.9, "top_k": [
    {"label": "Lime", "probability": 0.9}], "model_version": "1"}]}).encode()


@pytest.mark.parametrize("status", [500, 502, 504])
def test_kserve_protocols_retry_gateway_and_wrapper_errors(scripted: str, tmp_path: Path, status: int):
    Scripted.answers = [(status, b'{"error": "upstream"}'), (200, GOOD_V1)]
    code, output, rows = score_one_file(scripted, tmp_path, "--protocol", "kserve-v1")
    assert code == 0, output
    assert rows[0]["label"] == "Lime" and len(Scripted.posts) == 2


def test_torchserve_protocol_retries_500_from_a_dying_worker(scripted: str, tmp_path: Path):
    # A worker killed while answering gives its batch 500 (or 507): the next try reaches the new worker.
    Scripted.answers = [(500, b'{"code": 500, "type": "InternalServerException"}'), (200, GOOD_PLAIN)]
    code, output, rows = score_one_file(scripted, tmp_path)
    assert code == 0 and rows[0]["label"] == "Lime" and len(Scripted.posts) == 2, output


def test_a_500_that_stays_is_the_files_error_row(scripted: str, tmp_path: Path):
    Scripted.answers = [(500, b'{"code": 500, "error": "internal error while reading this request"}')]
    code, output, rows = score_one_file(scripted, tmp_path, "--protocol", "kserve-v2")
    assert code == 1 and rows[0]["error_code"] == "500" and len(Scripted.posts) == 3, output


def test_wrong_model_is_a_usage_error(scripted: str, tmp_path: Path):
    # KServe: 404 on the model's readiness path, and no /ping
    Scripted.ready = (404, b'{"error": "Model with name nope does not exist."}')
    code, output, _ = score_one_file(scripted, tmp_path, "--protocol", "kserve-v1", "--model", "nope")
    assert code == 2 and "'nope'" in output and "--model" in output, output
    assert not Scripted.posts


def test_wrong_model_on_torchserve_is_a_usage_error(deployed: TorchServe, tmp_path: Path):
    for protocol in ("torchserve", "kserve-v2"):
        code, output, _ = score_one_file(deployed.inference_url, tmp_path, "--protocol", protocol, "--model", "nope")
        assert code == 2 and "'nope'" in output, (protocol, output)


@pytest.mark.parametrize("answer", [
    b'{"predictions": [{"label": "Lime", "confidence": "high", "top_k": []}]}',
    b'{"predictions": [{"label": "Lime", "confidence": 0.9, "top_k": [{"label": "Lime"}]}]}',
    b'{"predictions": [{"label": "Lime", "confidence": 0.9, "top_k": "Lime"}]}',
    b'{"predictions": [{"label": ["Lime"], "confidence": 0.9, "top_k": []}]}',
    b'{"predictions": [{"error": {"nested": true}}]}',
    b'{"predictions": "Lime"}',
    b'{"predictions": [' + b"[" * 100_000 + b"]" * 100_000 + b"]}",
])
def test_malformed_answer_is_an_error_row(scripted: str, tmp_path: Path, answer: bytes):
    Scripted.answers = [(200, answer)]
    code, output, rows = score_one_file(scripted, tmp_path, "--protocol", "kserve-v1")
    assert code == 1, output
    assert rows[0]["status"] == "error" and rows[0]["error"], rows
