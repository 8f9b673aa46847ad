"""Reliability against a real torchserve: the bad-input corpus, overload, a killed worker.

Bad input never takes the server down or restarts a worker; overload is refused with fast
503s, not hangs; a killed worker is replaced and ``fruit-batch`` still scores every file
exactly once. Long soak runs (10,000 requests, memory) live in bench/reliability.py.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from click.testing import CliRunner
from conftest import build_store, jpeg_bytes, read_csv, start_fruit_batch, wait_for_rows
from fruitserve.batch.cli import main as batch_main
from fruitserve.batch.sources import LocalFolder
from fruitserve.handler.classifier import load_classifier
from fruitserve.handler.preprocessing import load_uint8
from fruitserve.model_store.torchserve_process import TorchServe
from fruitserve.train.synthetic import CLASSES

from bench.corpus import Case, cases, good_jpeg

pytestmark = pytest.mark.server
TIMEOUT = 60
CORPUS = cases()


@pytest.fixture(scope="module")
def store(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    # long enough a delay that concurrent requests share server-side batches, bad ones among good ones
    return build_store(trained_run, tmp_path_factory, "reliability", batch_size=16, max_batch_delay_ms=100, top_k=3)


@pytest.fixture(scope="module")
def server(store: Path, tmp_path_factory: pytest.TempPathFactory):
    with TorchServe(workdir=tmp_path_factory.mktemp("ts_reliability"), model_store=store) as ts:
        yield ts


@pytest.fixture(scope="module")
def local_labels(trained_run: Path):
    """The label the exported model gives some bytes, through the shared preprocessing: what the server must say."""
    classifier = load_classifier(trained_run, device="cpu")

    def label_of(payload: bytes) -> str:
        return classifier.answers(load_uint8(payload, classifier.config).unsqueeze(0), [1])[0]["label"]

    return label_of


def send(ts: TorchServe, case: Case) -> requests.Response:
    kwargs = {"files": case.files} if case.files else {"data": case.body}
    return requests.post(f"{ts.inference_url}/predictions/fruit", headers=ts.headers() | case.headers,
                         timeout=TIMEOUT, **kwargs)


def check_answer(case: Case, response: requests.Response, label_of) -> None:
    assert response.status_code == case.status, (case.name, response.status_code, response.text[:300])
    if not case.handler_answers:
        return  # TorchServe's frontend answered; what it says is not ours to shape
    body = response.json()
    if case.bad:
        # ours: {"error", "code", "type"}; TorchServe's frontend: {"code", "type", "message"}
        assert body["code"] == case.status and (body.get("error") or body.get("message")), (case.name, body)
    else:
        assert body["label"] and 0 < body["confidence"] <= 1 and len(body["top_k"]) == 3, (case.name, body)
        if case.file_name:  # the bytes are the image: the served label is the local one
            assert body["label"] == label_of(case.body), case.name


def assert_healthy(ts: TorchServe) -> None:
    ping = requests.get(f"{ts.inference_url}/ping", headers=ts.headers(), timeout=TIMEOUT)
    assert ping.status_code == 200 and ping.json()["status"] == "Healthy", ping.text


def test_corpus_has_thirty_kinds_and_both_answers():
    assert len({c.name for c in CORPUS}) == len(CORPUS) >= 30
    assert sum(c.bad for c in CORPUS) >= 20 and {400, 413, 415} <= {c.status for c in CORPUS}


def test_each_input_alone_gets_its_documented_answer(server: TorchServe, local_labels):
    pids = server.worker_pids()
    for case in CORPUS:
        check_answer(case, send(server, case), local_labels)
    assert_healthy(server)
    assert server.worker_pids() == pids and pids  # no input crashed or restarted the worker


def test_corpus_mixed_with_good_images_in_concurrent_batches(server: TorchServe, local_labels):
    pids = server.worker_pids()
    good = [Case(f"good_{i}", 200, "good", jpeg_bytes(sorted(CLASSES)[i % len(CLASSES)], seed=300 + i),
                 file_name=f"good_{i}.jpg") for i in range(24)]
    requests_ = [case for pair in zip(good, CORPUS, strict=False) for case in pair] + CORPUS[len(good):]
    requests_ = [c for c in requests_ if c.name != "body_over_max_request_size"]  # 21 MiB x rounds: alone above
    for _ in range(2):
        with ThreadPoolExecutor(max_workers=24) as pool:
            answers = list(pool.map(lambda c: send(server, c), requests_))
        for case, response in zip(requests_, answers, strict=True):
            check_answer(case, response, local_labels)
    assert_healthy(server)
    assert server.worker_pids() == pids


def corpus_folder(root: Path) -> Path:
    root.mkdir()
    for case in CORPUS:
        if case.file_name:
            (root / case.file_name).write_bytes(case.body)
    for i in range(6):
        (root / f"good_{i}.jpg").write_bytes(good_jpeg(seed=i))
    return root


def test_fruit_batch_on_the_corpus_one_row_each_exit_1(server: TorchServe, store: Path, tmp_path: Path):
    folder = corpus_folder(tmp_path / "corpus")
    expected = {c.file_name: c for c in CORPUS if c.file_name}
    runs = {
        "server": ["--url", server.inference_url, "--key-file", str(server.workdir / "key_file.json"),
                   "--concurrency", "8"],
        "local": ["--local", "--model", str(store / "fruit.mar")],
    }
    outputs = {}
    for mode, args in runs.items():
        out = tmp_path / f"{mode}.csv"
        result = CliRunner().invoke(batch_main, ["score", str(folder), str(out), "--quiet", *args])
        assert result.exit_code == 1, (mode, result.output)
        rows = read_csv(out)
        assert sorted(r["path"] for r in rows) == sorted(LocalFolder(folder).list()[0])
        assert len(rows) == len(expected) + 6
        for row in rows:
            case = expected.get(row["path"])
            if case is None or not case.bad:
                assert row["status"] == "ok" and row["label"], (mode, row)
            else:
                assert row["status"] == "error" and row["error"], (mode, row)
                assert int(row["error_code"]) == case.status, (mode, row)
        outputs[mode] = rows
    assert [(r["path"], r["status"], r["label"], r["error_code"]) for r in outputs["server"]] == \
        [(r["path"], r["status"], r["label"], r["error_code"]) for r in outputs["local"]]


@pytest.fixture(scope="module")
def small_queue_server(store: Path, tmp_path_factory: pytest.TempPathFactory):
    """A server whose job queue holds 8 requests, so that overload is easy to reach on 2 cores."""
    with TorchServe(workdir=tmp_path_factory.mktemp("ts_queue"), model_store=store,
                    extra_config={"job_queue_size": "8"}) as ts:
        yield ts


def hammer(ts: TorchServe, clients: int, seconds: float, payload: bytes) -> Counter:
    """``clients`` threads posting ``payload`` back to back for ``seconds``; counts statuses (or exception names)."""
    counts: Counter = Counter()
    lock = threading.Lock()
    deadline = time.monotonic() + seconds
    headers = ts.headers()

    def client() -> None:
        with requests.Session() as session:
            while time.monotonic() < deadline:
                try:
                    status = session.post(f"{ts.inference_url}/predictions/fruit", data=payload, headers=headers,
                                          timeout=TIMEOUT).status_code
                except requests.RequestException as exc:
                    status = type(exc).__name__
                with lock:
                    counts[status] += 1

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT + seconds)
    assert not any(t.is_alive() for t in threads), "a client hung"
    return counts


def test_load_below_capacity_has_no_errors(small_queue_server: TorchServe):
    counts = hammer(small_queue_server, clients=4, seconds=4, payload=good_jpeg())
    assert set(counts) == {200} and counts[200] > 0, counts


def test_overload_is_refused_with_503_not_hangs(small_queue_server: TorchServe):
    counts = hammer(small_queue_server, clients=48, seconds=4, payload=good_jpeg())
    # every request answered (hammer fails on a hang), only successes and clean refusals
    assert set(counts) <= {200, 503} and counts[200] > 0 and counts[503] > 0, counts
    assert_healthy(small_queue_server)
    assert requests.post(f"{small_queue_server.inference_url}/predictions/fruit", data=good_jpeg(),
                         headers=small_queue_server.headers(), timeout=TIMEOUT).status_code == 200


def test_killed_worker_is_replaced_and_fruit_batch_scores_every_file_once(
        small_queue_server: TorchServe, tmp_path: Path):
    ts = small_queue_server
    images = tmp_path / "images"
    images.mkdir()
    for i in range(240):
        (images / f"{i:04d}.jpg").write_bytes(jpeg_bytes(sorted(CLASSES)[i % len(CLASSES)], seed=i))
    out = tmp_path / "out.csv"
    old = ts.worker_pids()
    assert len(old) == 1
    process = start_fruit_batch(str(images), str(out), "--quiet", "--concurrency", "4", "--retries", "8",
                                "--url", ts.inference_url, "--key-file", str(ts.workdir / "key_file.json"))
    try:
        wait_for_rows(out, 40, process, timeout=TIMEOUT)
        os.kill(old[0], signal.SIGKILL)
        new = ts.wait_for_new_worker(old, timeout=90)
        _, err = process.communicate(timeout=300)
    finally:
        process.kill()
    assert len(new) == 1 and new != old
    assert process.returncode == 0, err
    rows = read_csv(out)
    assert [r["path"] for r in rows] == sorted(p.name for p in images.iterdir())  # each once, none missing
    assert all(r["status"] == "ok" for r in rows), [r for r in rows if r["status"] != "ok"][:3]
    assert_healthy(ts)
