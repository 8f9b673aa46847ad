"""MLflow tracking and the registry with real components: a SQLite store, a real ``mlflow server`` on a free
loopback port, registry references built into a .mar and served by a real torchserve, and the promotion gate
and rollback against a real server."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import torch
from conftest import TINY_TRAIN_ARGS, http_ok, jpeg_bytes, wait_until
from fruitserve.handler.classifier import load_classifier
from fruitserve.handler.preprocessing import load_uint8
from fruitserve.model_store.archive import main as archive_main
from fruitserve.model_store.torchserve_process import TorchServe, free_port
from fruitserve.train import train as train_module
from fruitserve.train.train import main as train_main

mlflow = pytest.importorskip("mlflow", reason="the tracking extra is not installed")
from mlflow.tracking import MlflowClient  # noqa: E402

TIMEOUT = 60
# what tests and CI want from MLflow: no telemetry, no job runner in the server, fail fast
MLFLOW_ENV = {"MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
              "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true", "GIT_PYTHON_REFRESH": "quiet",
              "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
TRACKED_ARGS = [a for a in TINY_TRAIN_ARGS if a != "--no-tracking"]


@pytest.fixture(autouse=True)
def mlflow_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in MLFLOW_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


class MlflowServer:
    """``mlflow server`` in its own process group, on a free loopback port, with its own SQLite store."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 180) -> MlflowServer:
        self.root.mkdir(parents=True, exist_ok=True)
        mlflow_cli = Path(sys.executable).parent / "mlflow"
        self._log = open(self.root / "server.log", "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [str(mlflow_cli), "server", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
             "--artifacts-destination", str(self.root / "artifacts"), "--host", "127.0.0.1", "--port",
             str(self.port), "--workers", "1"],
            env=os.environ | MLFLOW_ENV, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_until(lambda: http_ok(f"{self.url}/health"), "mlflow server", timeout=timeout, interval=0.5,
                       process=self.process, log=self.root / "server.log")
        except AssertionError:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.process is None:
            return
        for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.process.pid, sig)
                self.process.wait(timeout=wait)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
        self.process = None
        self._log.close()


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    server = MlflowServer(tmp_path_factory.mktemp("mlflow_server")).start()
    try:
        yield server
    finally:
        server.stop()


def train(demo_data: Path, out: Path, name: str, *extra: str) -> Path:
    assert train_main(["train", "--data", str(demo_data), "--output-dir", str(out), "--run-name", name,
                       *TRACKED_ARGS, "--epochs", "2", *extra]) == 0
    return out / name


@pytest.fixture(scope="module")
def served_run(demo_data: Path, mlflow_server: MlflowServer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny run tracked on the real server, and so registered there."""
    with pytest.MonkeyPatch.context() as patch:
        for key, value in MLFLOW_ENV.items():
            patch.setenv(key, value)
        return train(demo_data, tmp_path_factory.mktemp("tracked"), "tracked", "--tracking-uri", mlflow_server.url)


def test_a_run_is_tracked_in_a_sqlite_store(demo_data: Path, tmp_path: Path):
    run = train(demo_data, tmp_path / "runs", "local")  # the default store: sqlite beside the runs folder
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    meta = json.loads((run / "metadata.json").read_text())
    assert meta["tracking"]["uri"] == uri and meta["registry"] == {"name": "fruit", "version": "1",
                                                                    "alias": "candidate"}
    client = MlflowClient(uri)
    logged = client.get_run(meta["tracking"]["run_id"])
    assert logged.info.status == "FINISHED"
    params = logged.data.params
    assert params["epochs"] == "2" and params["input_size"] == "48" and params["seed"] == "0"
    assert params["data"] == str(demo_data) and "lr" in params and "label_smoothing" in params
    tags = logged.data.tags
    assert tags["dataset_fingerprint"] == meta["dataset"]["fingerprint"]
    assert tags["package.torch"].startswith("2.14.1") and tags["precision"] in ("bfloat16", "float32")
    assert tags["git_commit"] and tags["model_version"] == meta["model_version"]
    for key in ("train_loss", "train_acc", "val_top1", "val_macro_f1", "val_loss", "lr", "train_img_per_s"):
        assert [m.step for m in client.get_metric_history(logged.info.run_id, key)] == [0, 1], key
    assert logged.data.metrics["test_top1"] == pytest.approx(meta["metrics"]["test"]["top1"])
    assert logged.data.metrics["test_macro_f1"] == pytest.approx(meta["metrics"]["test"]["macro_f1"])
    files = {Path(f.path).name for f in client.list_artifacts(logged.info.run_id, "model")}
    assert {"model.pt", "index_to_name.json", "metadata.json", "metrics.json", "history.csv",
            "confusion_matrix.png"} <= files and "checkpoint.pt" not in files
    version = client.get_model_version_by_alias("fruit", "candidate")
    assert str(version.version) == "1" and version.run_id == logged.info.run_id
    assert (tmp_path / "mlartifacts").is_dir()  # artifacts beside the store, not in ./mlruns


def test_registry_reference_is_archived_and_served(served_run: Path, mlflow_server: MlflowServer, tmp_path: Path):
    store = tmp_path / "store"
    assert archive_main(["models:/fruit@candidate", "--tracking-uri", mlflow_server.url,
                         "--export-path", str(store)]) == 0
    with zipfile.ZipFile(store / "fruit.mar") as mar:
        meta = json.loads(mar.read("metadata.json"))
        assert mar.read("model.pt") == (served_run / "model.pt").read_bytes()
    run_meta = json.loads((served_run / "metadata.json").read_text())
    assert meta["registry"]["version"] == run_meta["registry"]["version"]
    assert meta["registry"]["run_id"] == run_meta["tracking"]["run_id"]
    assert archive_main([f"models:/fruit/{run_meta['registry']['version']}", "--tracking-uri", mlflow_server.url,
                         "--export-path", str(tmp_path / "by_version")]) == 0
    payload = jpeg_bytes("Lime", seed=3)
    with TorchServe(workdir=tmp_path / "ts", model_store=store) as ts:
        response = requests.put(f"{ts.inference_url}/predictions/fruit", data=payload, headers=ts.headers(),
                                timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    classifier = load_classifier(served_run, device="cpu")
    local = classifier.answers(load_uint8(payload, classifier.config).unsqueeze(0), [5])[0]
    assert response.json()["label"] == local["label"]
    assert response.json()["confidence"] == pytest.approx(local["confidence"], abs=1e-5)


def test_unknown_reference_is_a_clear_error(mlflow_server: MlflowServer, tmp_path: Path, capsys):
    assert archive_main(["models:/fruit@nobody", "--tracking-uri", mlflow_server.url,
                         "--export-path", str(tmp_path)]) == 2
    assert "cannot fetch models:/fruit@nobody" in capsys.readouterr().err


def with_metrics(run: Path, target: Path, change: float, version: str, labels: dict | None = None) -> Path:
    """A copy of ``run`` whose recorded Test metrics differ by ``change`` (the gate reads them from metadata)."""
    copy = shutil.copytree(run, target)
    meta = json.loads((copy / "metadata.json").read_text())
    for key in ("top1", "macro_f1"):
        meta["metrics"]["test"][key] = min(1.0, meta["metrics"]["test"][key] + change)
    meta["model_version"] = version
    meta.pop("registry", None)
    (copy / "metadata.json").write_text(json.dumps(meta))
    if labels is not None:
        (copy / "index_to_name.json").write_text(json.dumps(labels))
    return copy


def test_gate_refuses_worse_accepts_better_and_rolls_back(served_run: Path, mlflow_server: MlflowServer,
                                                          tmp_path: Path, capsys):
    store = tmp_path / "store"
    assert archive_main(["models:/fruit@candidate", "--tracking-uri", mlflow_server.url,
                         "--export-path", str(store)]) == 0
    first = json.loads((served_run / "metadata.json").read_text())
    base = first["metrics"]["test"]
    worse = with_metrics(served_run, tmp_path / "worse", -0.02, "20990101.000001")  # 2 points down
    better = with_metrics(served_run, tmp_path / "better", 0.005, "20990101.000002")
    labels = json.loads((served_run / "index_to_name.json").read_text())
    renamed = with_metrics(served_run, tmp_path / "renamed", 0.01, "20990101.000003",
                           labels | {"0": labels["0"] + " (other)"})
    with TorchServe(workdir=tmp_path / "ts", model_store=store, model_api=True) as ts:
        common = ["--export-path", str(store), "--key-file", str(ts.workdir / "key_file.json")]
        capsys.readouterr()
        assert archive_main([str(worse), "--register", ts.management_url, *common]) == 1
        err = capsys.readouterr().err
        assert "refused" in err and f"{base['top1']:.4f}" in err and "points below the served" in err
        assert archive_main([str(renamed), "--register", ts.management_url, *common]) == 1
        assert "class list differs" in capsys.readouterr().err
        assert served_version(ts) == first["model_version"]

        assert archive_main([str(better), "--register", ts.management_url, *common,
                             "--tracking-uri", mlflow_server.url]) == 0
        assert served_version(ts) == "20990101.000002"
        assert archive_main([str(worse), "--register", ts.management_url, *common, "--force"]) == 0
        assert served_version(ts) == "20990101.000001"
        client = MlflowClient(mlflow_server.url)

        assert archive_main(["--rollback", ts.management_url, *common]) == 0
        assert served_version(ts) == "20990101.000002"
        assert archive_main(["--rollback", ts.management_url, *common, "--tracking-uri", mlflow_server.url]) == 0
        assert served_version(ts) == first["model_version"]
        # the registry version the server serves again is the champion again
        assert str(client.get_model_version_by_alias("fruit", "champion").version) == first["registry"]["version"]
        assert archive_main(["--rollback", ts.management_url, *common]) == 1
        assert "nothing to roll back to" in capsys.readouterr().err


def served_version(ts: TorchServe) -> str:
    """The default version, by what the server answers /predictions/fruit with (not by what it describes)."""
    response = requests.put(f"{ts.inference_url}/predictions/fruit", data=jpeg_bytes("Lime", seed=9),
                            headers=ts.headers(), timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    return response.json()["model_version"]


def test_unreachable_tracking_server_exits_2_before_training(demo_data: Path, tmp_path: Path, capsys):
    start = time.monotonic()
    assert train_main(["train", "--data", str(demo_data), "--output-dir", str(tmp_path / "runs"), *TRACKED_ARGS,
                       "--tracking-uri", f"http://127.0.0.1:{free_port()}"]) == 2
    assert "cannot be reached" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # no run folder: nothing was trained
    assert time.monotonic() - start < TIMEOUT  # a clear error, not minutes of retries


def test_tracking_server_stopped_mid_run_training_completes(demo_data: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch, caplog):
    server = MlflowServer(tmp_path / "server").start()
    real_epoch = train_module.train_one_epoch

    def epoch_then_stop(setup, data, epoch, args):
        if epoch == 1:
            server.stop()  # the tracking server goes away during the second epoch
        return real_epoch(setup, data, epoch, args)

    monkeypatch.setattr(train_module, "train_one_epoch", epoch_then_stop)
    try:
        with caplog.at_level(logging.WARNING, logger="fruit-train"):
            run = train(demo_data, tmp_path / "runs", "survivor", "--tracking-uri", server.url)
    finally:
        server.stop()
    assert "MLflow tracking at" in caplog.text and "training goes on" in caplog.text
    meta = json.loads((run / "metadata.json").read_text())
    assert meta["tracking"]["run_id"] and "registry" not in meta  # logged at the start, not registered
    assert {"model.pt", "metrics.json", "history.csv"} <= {p.name for p in run.iterdir()}


def test_without_mlflow_training_runs_untracked(demo_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                caplog):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow now raises ImportError
    with caplog.at_level(logging.INFO, logger="fruit-train"):
        run = train(demo_data, tmp_path / "runs", "plain")
    assert "tracking off: MLflow is not installed" in caplog.text
    assert json.loads((run / "metadata.json").read_text())["tracking"] is None
    assert not (tmp_path / "mlflow.db").exists()


def test_resumed_run_continues_the_same_mlflow_run(demo_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    uri = f"sqlite:///{tmp_path / 'resume.db'}"
    real_epoch = train_module.train_one_epoch

    def interrupted(setup, data, epoch, args):
        if epoch == 1:
            raise KeyboardInterrupt
        return real_epoch(setup, data, epoch, args)

    monkeypatch.setattr(train_module, "train_one_epoch", interrupted)
    args = ["train", "--data", str(demo_data), "--output-dir", str(tmp_path / "runs"), "--run-name", "r",
            *TRACKED_ARGS, "--epochs", "2", "--tracking-uri", uri]
    assert train_main(args) == 130
    run_id = torch.load(tmp_path / "runs" / "r" / "checkpoint.pt", weights_only=True)["tracking_run_id"]
    assert MlflowClient(uri).get_run(run_id).info.status == "KILLED"
    monkeypatch.setattr(train_module, "train_one_epoch", real_epoch)
    assert train_main([*args, "--resume", str(tmp_path / "runs" / "r")]) == 0
    meta = json.loads((tmp_path / "runs" / "r" / "metadata.json").read_text())
    assert meta["tracking"]["run_id"] == run_id
    client = MlflowClient(uri)
    assert client.get_run(run_id).info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run_id, "val_loss")] == [0, 1]
