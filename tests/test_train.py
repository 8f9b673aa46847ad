"""End-to-end training on synthetic data, the exported artifacts, determinism, resume and the CLI."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_TRAIN_ARGS
from fruitserve.handler.artifacts import load_labels, load_torchscript
from fruitserve.handler.classifier import cpu_has_native_bf16, load_classifier, resolve_precision
from fruitserve.handler.preprocessing import PreprocessConfig, normalize
from fruitserve.train import data as datasets
from fruitserve.train import train as train_module
from fruitserve.train.model import build_model, export_torchscript
from fruitserve.train.synthetic import CLASSES
from fruitserve.train.train import main as train_main
from fruitserve.train.utils import autocast_dtype

ROOT = Path(__file__).resolve().parents[1]


def test_run_directory_has_every_artifact(trained_run: Path):
    for name in ("model.pt", "index_to_name.json", "metadata.json", "metrics.json", "history.csv",
                 "confusion_matrix.png", "confident_errors.png", "checkpoint.pt", "best.pt"):
        assert (trained_run / name).is_file(), name
    labels = json.loads((trained_run / "index_to_name.json").read_text())
    assert labels == {str(i): name for i, name in enumerate(sorted(CLASSES))}
    meta = json.loads((trained_run / "metadata.json").read_text())
    assert meta["arch"] == "resnet18" and meta["num_classes"] == len(CLASSES) and meta["input_size"] == 48
    assert meta["mean"] == [0.485, 0.456, 0.406] and len(meta["dataset"]["fingerprint"]) == 64
    assert meta["packages"]["torch"].startswith("2.14.1") and meta["model_version"]
    assert meta["export_max_abs_diff"] <= 1e-5
    assert meta["train_autocast"] == ("bfloat16" if cpu_has_native_bf16() else "float32")
    metrics = json.loads((trained_run / "metrics.json").read_text())
    test = metrics["test"]
    assert set(test["per_class"]) == set(CLASSES) and len(test["confusion_matrix"]) == len(CLASSES)
    assert sum(map(sum, test["confusion_matrix"])) == test["images"] == 8 * len(CLASSES)
    # sane accuracy: far above the 1/7 of guessing after a 6-epoch run on 189 images
    assert test["top1"] >= 0.6 and test["macro_f1"] >= 0.5


def test_best_epoch_has_the_best_validation_f1_then_loss(trained_run: Path):
    with open(trained_run / "history.csv", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 6
    best = max(rows, key=lambda r: (float(r["val_macro_f1"]), -float(r["val_loss"])))  # first of equals, like training
    assert json.loads((trained_run / "metadata.json").read_text())["best_epoch"] == int(best["epoch"])


def test_torchscript_loads_without_this_repo_and_matches_eager(trained_run: Path, tmp_path: Path):
    script = (
        "import sys, torch; m = torch.jit.load(sys.argv[1]); "
        "print(tuple(m(torch.zeros(2, 3, 48, 48)).shape))"
    )
    out = subprocess.run([sys.executable, "-I", "-W", "ignore", "-c", script, str(trained_run / "model.pt")],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"(2, {len(CLASSES)})"

    eager = build_model("resnet18", len(CLASSES))
    eager.load_state_dict(torch.load(trained_run / "best.pt", weights_only=True))
    eager.eval()
    x = torch.randn(4, 3, 48, 48)
    scripted = load_torchscript(trained_run / "model.pt", torch.device("cpu"))
    with torch.inference_mode():
        torch.testing.assert_close(scripted(x), eager(x), atol=1e-5, rtol=0)
    assert export_torchscript(eager, tmp_path / "again.pt", x) <= 1e-5
    # what serving, fruit-batch --local and evaluate run (load_classifier, in fp32 here): normalisation and batch
    # norm folded into the convolutions, oneDNN layouts; the same logits
    classifier = load_classifier(trained_run, device="cpu", precision="fp32")
    images = torch.randint(0, 256, (4, 3, 48, 48), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    mean, std = classifier.config.mean, classifier.config.std
    with torch.inference_mode():
        for batch in (images, images[:1]):
            torch.testing.assert_close(classifier.logits(batch), scripted(normalize(batch, mean, std)), atol=1e-4, rtol=0)


def test_same_seed_gives_same_metrics(demo_data: Path, tmp_path: Path):
    args = ["train", "--data", str(demo_data), "--output-dir", str(tmp_path), *TINY_TRAIN_ARGS, "--epochs", "2"]
    assert train_main([*args, "--run-name", "a"]) == 0
    assert train_main([*args, "--run-name", "b"]) == 0
    metrics = [json.loads((tmp_path / r / "metrics.json").read_text()) for r in "ab"]
    assert metrics[0]["test"]["confusion_matrix"] == metrics[1]["test"]["confusion_matrix"]
    assert metrics[0]["validation"]["macro_f1"] == metrics[1]["validation"]["macro_f1"]
    history = [(tmp_path / r / "history.csv").read_text().splitlines() for r in "ab"]
    losses = [[line.split(",")[2] for line in h[1:]] for h in history]
    assert losses[0] == losses[1]


def test_export_epoch_last_runs_the_whole_schedule_and_exports_its_final_weights(demo_data: Path, tmp_path: Path):
    # --patience 0 stops a best-epoch run after its first epoch; --export-epoch last ignores it
    args = ["train", "--data", str(demo_data), "--output-dir", str(tmp_path), *TINY_TRAIN_ARGS, "--epochs", "3",
            "--patience", "0", "--val-stretch", "4"]
    assert train_main([*args, "--run-name", "best"]) == 0
    assert train_main([*args, "--run-name", "last", "--export-epoch", "last"]) == 0
    best, last = (json.loads((tmp_path / r / "metadata.json").read_text()) for r in ("best", "last"))
    assert (best["epochs_run"], best["exported_epoch"]) == (1, 0)
    assert (last["epochs_run"], last["exported_epoch"]) == (3, 2)
    assert last["training"]["val_stretch"] == 4
    # validation held out of training in stretches: max_distance is fitted on it as it is, no frames held out again
    fitted_on = last["uncertainty"]["fitted_on"]["max_distance"]
    assert fitted_on.endswith("as it is (split by --val-stretch: no frames held out again)")
    # fruit-train calibrate refits it from what the run recorded, not from its own command line
    assert train_main(["calibrate", str(tmp_path / "last"), "--no-progress"]) == 0
    refitted = json.loads((tmp_path / "last" / "metadata.json").read_text())["uncertainty"]
    assert refitted["fitted_on"]["max_distance"] == fitted_on
    assert refitted["max_distance"] == pytest.approx(last["uncertainty"]["max_distance"], abs=1e-4)
    final = build_model("resnet18", len(CLASSES))
    final.load_state_dict(torch.load(tmp_path / "last" / "checkpoint.pt", weights_only=True)["model"])
    final.eval()
    x = torch.randn(2, 3, 48, 48)
    with torch.inference_mode():
        torch.testing.assert_close(load_torchscript(tmp_path / "last" / "model.pt", torch.device("cpu"))(x), final(x),
                                   atol=1e-5, rtol=0)


def test_interrupted_run_resumes_to_the_same_result(demo_data: Path, tmp_path: Path, monkeypatch):
    args = ["train", "--data", str(demo_data), "--output-dir", str(tmp_path), *TINY_TRAIN_ARGS, "--epochs", "3"]
    assert train_main([*args, "--run-name", "full"]) == 0

    real_epoch = train_module.train_one_epoch
    calls = []

    def interrupted_epoch(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C during the second epoch
        return real_epoch(*a, **kw)

    monkeypatch.setattr(train_module, "train_one_epoch", interrupted_epoch)
    assert train_main([*args, "--run-name", "part"]) == 130
    assert torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=True)["epoch"] == 0
    assert not (tmp_path / "part" / "model.pt").exists()
    monkeypatch.setattr(train_module, "train_one_epoch", real_epoch)

    # resumed with another split or schedule, it would train on other images: refused, the options named
    assert train_main([*args, "--resume", str(tmp_path / "part"), "--val-stretch", "4"]) == 2
    assert train_main([*args, "--resume", str(tmp_path / "part")]) == 0
    full = json.loads((tmp_path / "full" / "metrics.json").read_text())
    resumed = json.loads((tmp_path / "part" / "metrics.json").read_text())
    assert resumed["test"]["confusion_matrix"] == full["test"]["confusion_matrix"]
    assert (tmp_path / "part" / "history.csv").read_text().count("\n") == 4  # header + 3 epochs


def test_evaluate_reproduces_training_report(trained_run: Path, demo_data: Path, tmp_path: Path):
    assert train_main(["evaluate", str(trained_run / "model.pt"), str(demo_data / "Test"), "--out", str(tmp_path),
                       "--precision", "fp32", "--no-progress"]) == 0
    evaluated = json.loads((tmp_path / "metrics.json").read_text())
    reported = json.loads((trained_run / "metrics.json").read_text())["test"]
    assert evaluated["confusion_matrix"] == reported["confusion_matrix"]
    assert evaluated["macro_f1"] == pytest.approx(reported["macro_f1"])
    assert (tmp_path / "confusion_matrix.png").stat().st_size > 10_000


def test_evaluation_tensors_are_the_shared_preprocessing(trained_run: Path, demo_data: Path):
    """Training evaluation feeds the model exactly ``normalize(load_uint8(bytes))``."""
    from fruitserve.handler.preprocessing import preprocess

    config = PreprocessConfig(input_size=48)
    index = datasets.index_image_folder(demo_data / "Test", load_labels(trained_run / "index_to_name.json"))
    decoded = datasets.decode_images(index.paths[:10], index.targets[:10], config, progress=False)
    direct = torch.stack([preprocess(p.read_bytes(), config) for p in index.paths[:10]])
    assert torch.equal(normalize(decoded.images, config.mean, config.std), direct)


def test_precision_choice():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == ("bf16" if cpu_has_native_bf16() else "fp32")
    assert resolve_precision("auto", torch.device("cuda")) == "fp16"
    assert resolve_precision("fp32", cpu) == "fp32" and resolve_precision("bf16", cpu) == "bf16"
    with pytest.raises(ValueError, match="fp16 is for CUDA"):
        resolve_precision("fp16", cpu)
    assert autocast_dtype(cpu, "fp32") is None
    assert autocast_dtype(cpu, "bf16") is torch.bfloat16
    assert autocast_dtype(torch.device("cuda"), "auto") is torch.float16
    assert autocast_dtype(cpu, "auto") is (torch.bfloat16 if cpu_has_native_bf16() else None)
    if cpu_has_native_bf16():  # only where the instructions exist (never on an AVX2-only CPU)
        assert torch.backends.cpu.get_cpu_capability() in ("AVX512", "AMX")


def test_weights_file_is_loaded_and_checked(tmp_path: Path):
    source = build_model("resnet18", 1000)
    torch.save(source.state_dict(), tmp_path / "imagenet_like.pt")
    model = build_model("resnet18", 5, tmp_path / "imagenet_like.pt")
    assert torch.equal(model.conv1.weight, source.conv1.weight)
    assert model.fc.out_features == 5
    torch.save({"unrelated": torch.zeros(3)}, tmp_path / "junk.pt")
    with pytest.raises(ValueError, match="does not look like"):
        build_model("resnet18", 5, tmp_path / "junk.pt")


@pytest.mark.parametrize("command", [[], ["train"], ["evaluate"], ["export"], ["calibrate"], ["make-demo-data"]])
def test_cli_help(command):
    out = subprocess.run([sys.executable, "-m", "fruitserve.train.train", *command, "--help"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and "usage: fruit-train" in out.stdout


def test_evaluate_missing_model_exits_2(tmp_path: Path, demo_data: Path):
    assert train_main(["evaluate", str(tmp_path / "model.pt"), str(demo_data / "Test")]) == 2


def test_onnx_export_gives_the_torchscript_answers(trained_run: Path, demo_data: Path, tmp_path: Path):
    onnxruntime = pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
    run = shutil.copytree(trained_run, tmp_path / "run")
    assert train_main(["export", str(run), "--format", "onnx"]) == 0
    session = onnxruntime.InferenceSession(str(run / "model.onnx"), providers=["CPUExecutionProvider"])
    classifier = load_classifier(run, device="cpu", precision="fp32")
    config = classifier.config
    index = datasets.index_image_folder(demo_data / "Test", classifier.labels)
    images = datasets.decode_images(index.paths[::4], index.targets[::4], config, progress=False).images
    for batch in (images, images[:1]):  # the batch dimension is dynamic
        inputs = normalize(batch, config.mean, config.std)
        onnx_probs = torch.softmax(torch.from_numpy(session.run(["logits"], {"images": inputs.numpy()})[0]), dim=1)
        served = torch.softmax(classifier.logits(batch), dim=1)  # the graph's own softmax (not calibrated)
        assert torch.equal(onnx_probs.argmax(1), served.argmax(1))
        assert float((onnx_probs - served).abs().max()) <= 1e-4


def test_calibrate_refits_an_existing_run_to_the_same_rule(trained_run: Path, tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture):
    run = shutil.copytree(trained_run, tmp_path / "run")
    original = json.loads((run / "metadata.json").read_text())["uncertainty"]
    meta = json.loads((run / "metadata.json").read_text())
    del meta["uncertainty"]
    (run / "metadata.json").write_text(json.dumps(meta))
    (run / "feature_stats.npz").unlink()
    with caplog.at_level("WARNING", logger="fruit-train"):
        assert train_main(["calibrate", str(run), "--no-progress"]) == 0
    refitted = json.loads((run / "metadata.json").read_text())["uncertainty"]
    # a model too weak for the answered-accuracy target says so, and only then
    weak = not refitted["augmented"]["accuracy_answered"] >= 0.998
    assert ("too weak" in caplog.text) == weak
    assert (run / "feature_stats.npz").is_file()
    for key in ("temperature", "max_distance", "min_confidence"):
        assert refitted[key] == pytest.approx(original[key], rel=1e-6), key
    assert refitted["out_of_distribution"] == original["out_of_distribution"]
