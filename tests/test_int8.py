"""int8: ``fruit-train export --format int8`` quantises the served graph; ``precision int8`` serves it.

Static int8 rounds weights per output channel and activations to 256 levels calibrated on validation images, a
coarser grid than bf16: on the shipped model and the full Test split it kept top-1 to the digit (macro-F1 -0.003 points), with
at most 0.066 between their probabilities (BENCHMARKS.md, Serving). Here: the demo model, its export, its answers
against fp32's, and the graph served from ``fruit.mar`` by TorchServe and by ``fruit-batch --local``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import requests
import torch
from click.testing import CliRunner
from conftest import assert_labels_agree, drawn_fruit, jpeg_bytes, read_csv, real_fruit_photos
from fruitserve.batch.cli import main as batch_main
from fruitserve.handler.artifacts import INT8_MODEL_FILE
from fruitserve.handler.classifier import cpu_has_native_bf16, cpu_has_vnni, load_classifier, resolve_precision
from fruitserve.handler.errors import ModelDirError
from fruitserve.handler.preprocessing import load_uint8
from fruitserve.model_store.archive import build_archive
from fruitserve.model_store.torchserve_process import TorchServe
from fruitserve.train.train import main as train_main

pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")

# fp32 is sure of its label when the runner-up is this far behind: then int8 must give the same label
CLEAR_MARGIN = 0.2
# the largest difference between the two precisions' probabilities for one class (shipped model: 0.066)
MAX_PROBABILITY_DIFFERENCE = 0.15


@pytest.fixture(scope="module")
def int8_run(trained_run: Path) -> Path:
    """The session's run: training wrote its int8 graph."""
    assert (trained_run / INT8_MODEL_FILE).is_file(), "fruit-train train writes model.int8.onnx"
    return trained_run


@pytest.fixture()
def run_without_int8(trained_run: Path, tmp_path: Path) -> Path:
    """A run trained with --no-int8 (or before int8 existed): a copy of the session's run without the file."""
    run = tmp_path / "tiny"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns(INT8_MODEL_FILE))
    return run


@pytest.fixture(scope="module")
def fp32_and_int8(int8_run: Path):
    return (load_classifier(int8_run, device="cpu", precision="fp32"),
            load_classifier(int8_run, device="cpu", precision="int8"))


def demo_test_images(demo_data: Path, classifier) -> torch.Tensor:
    files = sorted((demo_data / "Test").rglob("*.jpg"))
    return torch.stack([load_uint8(f.read_bytes(), classifier.config) for f in files])


def test_int8_answers_the_demo_test_split_as_fp32(fp32_and_int8, demo_data: Path):
    fp32, int8 = fp32_and_int8
    images = demo_test_images(demo_data, fp32)
    reference, quantized = fp32.predict(images), int8.predict(images)
    # mostly clear cases; overall, near ties included, at most one label in fifty may differ
    assert_labels_agree(reference.probabilities, quantized.probabilities, max_difference=MAX_PROBABILITY_DIFFERENCE,
                        clear_margin=CLEAR_MARGIN, clear_in=2, flips_in=50)
    # the features the uncertainty rule measures come out of the int8 graph too, close to fp32's
    f32, f8 = reference.features, quantized.features
    assert f8.shape == f32.shape
    assert float(torch.nn.functional.cosine_similarity(f32, f8).min()) > 0.95


@pytest.mark.parametrize("photos", [real_fruit_photos, drawn_fruit], ids=["fruits360-photos", "drawn-fruit"])
def test_int8_answers_real_looking_images_as_fp32(fp32_and_int8, photos):
    fp32, int8 = fp32_and_int8
    images = torch.stack([load_uint8(data, fp32.config) for data in photos()])
    # the demo model knows 7 drawn classes: on photos it often hesitates, and there a label may flip (6 of 141
    # Fruits-360 photos did); where fp32 is clear (a third of the set at least), int8 must agree
    assert_labels_agree(fp32.predict(images).probabilities, int8.predict(images).probabilities,
                        max_difference=MAX_PROBABILITY_DIFFERENCE, clear_margin=CLEAR_MARGIN, clear_in=3,
                        flips_in=None)


def test_int8_needs_its_file_and_export_makes_it(run_without_int8: Path, capsys):
    with pytest.raises(ModelDirError, match="--format int8"):
        load_classifier(run_without_int8, device="cpu", precision="int8")
    assert load_classifier(run_without_int8, device="cpu").precision in ("bf16", "fp32")  # auto: no int8 to pick
    assert train_main(["export", str(run_without_int8), "--format", "int8", "--no-progress"]) == 0
    assert "the same top-1 label as fp32 on" in capsys.readouterr().out
    assert load_classifier(run_without_int8, device="cpu", precision="int8").precision == "int8"


def test_auto_picks_int8_only_where_the_cpu_has_vnni(int8_run: Path):
    expected = "int8" if cpu_has_vnni() else ("bf16" if cpu_has_native_bf16() else "fp32")
    assert load_classifier(int8_run, device="cpu").precision == expected
    assert resolve_precision("auto", torch.device("cpu"), int8_available=True) == "int8"
    with pytest.raises(ValueError, match="int8 runs on the CPU"):
        resolve_precision("int8", torch.device("cuda"))


def test_int8_is_served_from_fruit_mar_and_by_fruit_batch(int8_run: Path, fp32_and_int8, tmp_path: Path):
    config = tmp_path / "int8-config.yaml"
    config.write_text("minWorkers: 1\nmaxWorkers: 1\nbatchSize: 4\nmaxBatchDelay: 5\nresponseTimeout: 60\n"
                      "handler:\n  precision: int8\n")
    store = tmp_path / "store"
    build_archive(int8_run, store, config_file=config)
    payload = jpeg_bytes("Lime", seed=5)
    local = fp32_and_int8[1]
    expected = local.answers(load_uint8(payload, local.config)[None], [3])[0]
    with TorchServe(workdir=tmp_path / "ts", model_store=store) as ts:
        response = requests.post(f"{ts.inference_url}/predictions/fruit", data=payload, headers=ts.headers(),
                                 timeout=60)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["precision"] == "int8" and body["label"] == expected["label"]
    assert body["confidence"] == pytest.approx(expected["confidence"], abs=1e-4)

    images = tmp_path / "images"
    images.mkdir()
    (images / "lime.jpg").write_bytes(payload)
    out = tmp_path / "out.csv"
    result = CliRunner().invoke(batch_main, ["score", str(images), str(out), "--local", "--model",
                                             str(store / "fruit.mar"), "--precision", "int8", "--quiet"])
    assert result.exit_code == 0, result.output
    (row,) = read_csv(out)
    assert (row["status"], row["precision"], row["label"]) == ("ok", "int8", expected["label"])
