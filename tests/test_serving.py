"""Against a real torchserve on free loopback ports: JSON, batching with bad input, tokens, registration."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import torch
from conftest import build_store, image_bytes, jpeg_bytes
from fruitserve.handler.artifacts import load_labels, load_metadata
from fruitserve.handler.classifier import int8_servable, load_classifier, resolve_precision
from fruitserve.handler.preprocessing import load_uint8
from fruitserve.model_store.archive import HANDLER_DIR, build_archive
from fruitserve.model_store.archive import main as archive_main
from fruitserve.model_store.torchserve_process import TorchServe
from fruitserve.train.synthetic import CLASSES
from PIL import Image

pytestmark = pytest.mark.server
TIMEOUT = 60


@pytest.fixture(scope="module")
def batching_store(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An archive that waits long enough to put concurrent requests into one server-side batch."""
    return build_store(trained_run, tmp_path_factory, "batching", batch_size=8, max_batch_delay_ms=300, top_k=3)


@pytest.fixture(scope="module")
def server(batching_store: Path, tmp_path_factory: pytest.TempPathFactory):
    with TorchServe(workdir=tmp_path_factory.mktemp("ts"), model_store=batching_store) as ts:
        yield ts


def local_predictions(run: Path, payloads: list[bytes], k: int) -> list[dict]:
    """What the served model must answer: the run loaded in this process, the way the handler loads it."""
    classifier = load_classifier(run, device="cpu")
    return classifier.answers(torch.stack([load_uint8(p, classifier.config) for p in payloads]), [k] * len(payloads))


def post(ts: TorchServe, **kwargs) -> requests.Response:
    headers = ts.headers() | kwargs.pop("headers", {})
    return requests.post(f"{ts.inference_url}/predictions/fruit", headers=headers, timeout=TIMEOUT, **kwargs)


def assert_same_prediction(served: dict, local: dict) -> None:
    assert served["label"] == local["label"] and served["model_version"] == local["model_version"]
    assert [t["label"] for t in served["top_k"]] == [t["label"] for t in local["top_k"]]
    for a, b in zip(served["top_k"], local["top_k"], strict=True):
        assert a["probability"] == pytest.approx(b["probability"], abs=1e-5)


def test_prediction_json_equals_local_evaluation(server: TorchServe, trained_run: Path):
    payload = jpeg_bytes("Lime", seed=5)
    response = requests.put(f"{server.inference_url}/predictions/fruit", data=payload, headers=server.headers(),
                            timeout=TIMEOUT)  # what `curl -T apple.jpg` sends
    assert response.status_code == 200 and response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"label", "index", "confidence", "uncertain", "ood_score", "top_k", "model_version",
                         "precision"}
    assert isinstance(body["uncertain"], bool) and 0 <= body["ood_score"] <= 1
    # the handler's precision is "auto": int8 where the run has its int8 graph and the CPU VNNI, else bf16 where the
    # CPU has native bf16, else fp32
    assert body["precision"] == resolve_precision("auto", torch.device("cpu"), int8_servable(trained_run))
    assert len(body["top_k"]) == 3 and body["confidence"] == body["top_k"][0]["probability"]
    assert_same_prediction(body, local_predictions(trained_run, [payload], 3)[0])


def test_every_client_encoding_gives_the_same_answer(server: TorchServe):
    payload = jpeg_bytes("Orange", seed=2)
    b64 = base64.b64encode(payload).decode()
    answers = [
        post(server, data=payload),
        post(server, files={"data": ("orange.jpg", payload, "image/jpeg")}),
        post(server, files={"file": ("orange.jpg", payload, "image/jpeg")}),
        post(server, json={"data": b64}),
        post(server, data=json.dumps({"data": b64}), headers={"Content-Type": "text/plain"}),
    ]
    assert [a.status_code for a in answers] == [200] * len(answers)
    assert len({json.dumps(a.json(), sort_keys=True) for a in answers}) == 1


def test_top_k_per_request_and_clamped_to_classes(server: TorchServe):
    payload = jpeg_bytes("Kiwi", seed=1)
    assert len(post(server, data=payload, headers={"X-Top-K": "1"}).json()["top_k"]) == 1
    assert len(post(server, json={"data": base64.b64encode(payload).decode(), "top_k": 2}).json()["top_k"]) == 2
    everything = post(server, data=payload, headers={"X-Top-K": "1000"}).json()["top_k"]
    assert len(everything) == len(CLASSES)
    assert sum(t["probability"] for t in everything) == pytest.approx(1.0, abs=1e-5)
    bad = post(server, data=payload, headers={"X-Top-K": "zero"})
    assert bad.status_code == 400 and "top_k" in bad.json()["error"]


def bad_inputs() -> dict[str, tuple[bytes, int]]:
    huge = image_bytes(Image.new("1", (20000, 20000)), "PNG")
    return {
        "empty": (b"", 400),
        "text": (b"just some text, not a picture", 415),
        "corrupt": (b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4, 400),
        "truncated_jpeg": (jpeg_bytes("Banana", seed=9)[:300], 400),
        "huge_png": (huge, 413),
        "bad_base64": (b'{"data": "***not base64***"}', 400),
    }


def test_bad_requests_in_a_batch_fail_alone(server: TorchServe, trained_run: Path):
    pids_before = server.worker_pids()
    good = [(f"good_{i}", jpeg_bytes(sorted(CLASSES)[i % len(CLASSES)], seed=100 + i)) for i in range(10)]
    bad = [(name, payload) for name, (payload, _) in bad_inputs().items()]
    mixed = [item for pair in zip(good, bad + [None] * len(good), strict=False) for item in pair if item]
    with ThreadPoolExecutor(max_workers=len(mixed)) as pool:
        responses = dict(zip([n for n, _ in mixed], pool.map(lambda item: post(server, data=item[1]), mixed), strict=True))
    expected = local_predictions(trained_run, [p for _, p in good], 3)
    for (name, _), local in zip(good, expected, strict=True):
        assert responses[name].status_code == 200, (name, responses[name].text)
        assert_same_prediction(responses[name].json(), local)
    for name, (_, status) in bad_inputs().items():
        answer = responses[name]
        assert answer.status_code == status, (name, answer.text)
        assert answer.json()["code"] == status and answer.json()["error"]
    # still healthy, same worker: bad input never crashed or restarted it
    ping = requests.get(f"{server.inference_url}/ping", headers=server.headers(), timeout=TIMEOUT)
    assert ping.status_code == 200 and ping.json()["status"] == "Healthy"
    assert server.worker_pids() == pids_before and pids_before
    assert post(server, data=good[0][1]).status_code == 200


def test_logs_each_request_once_and_no_debug_lines(server: TorchServe):
    """The repository's log4j2.xml is in effect: one access line per request, ts_log.log without
    TorchServe's per-request DEBUG lines or a second copy of the access and metric lines."""
    logs = server.workdir / "logs"

    def access_lines() -> int:
        return (logs / "access_log.log").read_text().count('"POST /predictions/fruit HTTP/1.1"')

    before = access_lines()
    for seed in range(3):
        assert post(server, data=jpeg_bytes("Banana", seed=300 + seed)).status_code == 200
    assert access_lines() == before + 3
    ts_log = (logs / "ts_log.log").read_text()
    assert "Torchserve version" in ts_log  # it is written, at INFO
    assert "[DEBUG]" not in ts_log and "ACCESS_LOG" not in ts_log and "TS_METRICS" not in ts_log


def test_body_over_max_request_size_is_refused(server: TorchServe):
    response = post(server, data=b"\0" * (21 * 1024 * 1024))
    assert response.status_code == 413


def test_token_is_required(server: TorchServe):
    payload = jpeg_bytes()
    no_token = requests.post(f"{server.inference_url}/predictions/fruit", data=payload, timeout=TIMEOUT)
    wrong = requests.post(f"{server.inference_url}/predictions/fruit", data=payload, timeout=TIMEOUT,
                          headers={"Authorization": "Bearer not-the-token"})
    assert no_token.status_code == wrong.status_code == 400  # TorchServe 0.12 answers 400 InvalidKeyException
    assert "Token" in no_token.json()["message"]
    management = requests.get(f"{server.management_url}/models", headers=server.headers("inference"), timeout=TIMEOUT)
    assert management.status_code == 400  # the inference key does not open the management API
    assert post(server, data=payload).status_code == 200


def test_model_api_is_off_by_default(server: TorchServe):
    response = requests.post(f"{server.management_url}/models", params={"url": "fruit.mar"},
                             headers=server.headers("management"), timeout=TIMEOUT)
    assert response.status_code == 405 or "disabled" in response.text.lower()


def test_rebuild_and_register_serves_new_version_and_keeps_old(
    model_store: Path, trained_run: Path, tmp_path: Path, capsys
):
    store = tmp_path / "store"
    shutil.copytree(model_store, store)
    old_version = load_metadata(trained_run / "metadata.json")["model_version"]
    retrained = tmp_path / "retrained"
    shutil.copytree(trained_run, retrained)
    meta = load_metadata(retrained / "metadata.json") | {"model_version": "99990101.000000"}
    (retrained / "metadata.json").write_text(json.dumps(meta))
    with TorchServe(workdir=tmp_path / "ts", model_store=store, model_api=True) as ts:
        # an archive from a URL is never fetched, whatever the management token
        remote = requests.post(f"{ts.management_url}/models", params={"url": "http://127.0.0.1:9/evil.mar"},
                               headers=ts.headers("management"), timeout=TIMEOUT)
        assert remote.status_code >= 400
        code = archive_main([str(retrained), "--export-path", str(store), "--register", ts.management_url,
                             "--key-file", str(ts.workdir / "key_file.json")])
        out = capsys.readouterr().out
        assert code == 0, out
        assert "99990101.000000" in out and old_version in out  # prints how to roll back
        payload = jpeg_bytes("Carrot", seed=3)
        assert post(ts, data=payload).json()["model_version"] == "99990101.000000"
        old = requests.post(f"{ts.inference_url}/predictions/fruit/{old_version}", data=payload,
                            headers=ts.headers(), timeout=TIMEOUT)
        assert old.status_code == 200 and old.json()["model_version"] == old_version


def test_incomplete_run_is_a_clear_error(tmp_path: Path, trained_run: Path, capsys):
    shutil.copytree(trained_run, tmp_path / "run")
    (tmp_path / "run" / "index_to_name.json").unlink()
    assert archive_main([str(tmp_path / "run"), "--export-path", str(tmp_path / "store")]) == 2
    assert "missing index_to_name.json" in capsys.readouterr().err
    assert not (tmp_path / "store" / "fruit.mar").exists()


def test_archive_contents(model_store: Path):
    names = set(zipfile.ZipFile(model_store / "fruit.mar").namelist())
    package = {f"fruitserve/handler/{p.name}" for p in HANDLER_DIR.glob("*.py")}
    assert {"model.pt", "fruit_handler.py", "index_to_name.json", "metadata.json", "model-config.yaml",
            "MAR-INF/MANIFEST.json"} | package <= names
    manifest = json.loads(zipfile.ZipFile(model_store / "fruit.mar").read("MAR-INF/MANIFEST.json"))
    assert manifest["model"]["modelName"] == "fruit" and manifest["model"]["modelVersion"]
    assert manifest["model"]["handler"] == "fruit_handler.py"


SELF_CONTAINED = """
import importlib, pkgutil, sys
archive, site_packages = sys.argv[1:3]
sys.path[:0] = [archive, site_packages]
import fruit_handler  # what TorchServe imports, from the archive's root
import fruitserve.handler as package
assert package.__file__.startswith(archive), package.__file__
for module in pkgutil.iter_modules(package.__path__):
    importlib.import_module(f"fruitserve.handler.{module.name}")
from fruitserve.handler.classifier import load_classifier, resolve_precision
print(len(load_classifier(archive, device="cpu").labels))
"""


def test_archive_is_self_contained(model_store: Path, tmp_path: Path):
    """The handler runs from the archive alone: a Python that sees the unpacked .mar and the site-packages, but not
    the installed fruitserve (``-S``: no .pth files, so no editable install), imports and loads everything."""
    with zipfile.ZipFile(model_store / "fruit.mar") as archive:
        archive.extractall(tmp_path / "mar")
    out = subprocess.run([sys.executable, "-S", "-W", "ignore", "-c", SELF_CONTAINED, str(tmp_path / "mar"),
                          sysconfig.get_paths()["purelib"]], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == str(len(CLASSES))


def test_concurrent_builds_keep_their_own_files(tmp_path: Path, trained_run: Path):
    # torch-model-archiver stages in $TMPDIR/<model name>; two builds at once must not swap files.
    runs = []
    for i in range(2):
        run = shutil.copytree(trained_run, tmp_path / f"run{i}")
        labels = load_labels(run / "index_to_name.json")
        (run / "index_to_name.json").write_text(json.dumps({str(j): f"{name} {i}" for j, name in enumerate(labels)}))
        runs.append(run)
    with ThreadPoolExecutor(max_workers=4) as pool:
        built = list(pool.map(lambda job: build_archive(runs[job % 2], tmp_path / f"store{job}")[0], range(4)))
    for job, archive in enumerate(built):
        labels = json.loads(zipfile.ZipFile(archive).read("index_to_name.json"))
        assert labels["0"].endswith(f" {job % 2}"), (job, labels)
