"""``fruit-train``: train a torchvision ResNet on an image folder, evaluate it, export TorchScript.

    fruit-train make-demo-data data/demo
    fruit-train train --data data/demo --epochs 8
    fruit-train train --data ../shared/data/fruits-360          # Training/ + Test/
    fruit-train evaluate runs/<run> ../shared/data/fruits-360/Test
    fruit-train export runs/<run> --format onnx                  # model.onnx next to model.pt

Model selection (early stopping, best checkpoint) uses a validation split carved from
Training; ``Test/`` is only ever reported, after training is over.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import importlib.util
import json
import logging
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from fruitserve.handler.artifacts import (
    LABELS_FILE,
    METADATA_FILE,
    MODEL_FILE,
    load_labels,
    load_metadata,
    load_torchscript,
    require_files,
)
from fruitserve.handler.classifier import AUTO_PRECISION, PRECISIONS, Classifier, load_classifier, select_device, wrap_module
from fruitserve.handler.errors import ModelDirError
from fruitserve.handler.preprocessing import PreprocessConfig, decode_image, normalize, resize_and_crop, to_uint8_tensor

from . import data as datasets
from .model import ARCHES, build_model, eager_from_torchscript, export_onnx, export_torchscript, set_backbone_trainable
from .ood import out_of_distribution
from .presets import TrainAugment
from .quantize import CALIBRATION_IMAGES, quantize_run
from .reports import (
    classification_metrics,
    plot_confident_errors,
    plot_confusion_matrix,
    plot_reliability,
    plot_score_histograms,
)
from .synthetic import make_demo_data
from .tracking import CANDIDATE, NoTracker, Tracker, TrackingError, resolve_tracking_uri, start_tracking
from .uncertainty import ANSWERED_ACCURACY, answered_summary, fit_rule, holdout_frames
from .utils import (
    autocast_dtype,
    git_commit,
    package_versions,
    progress,
    save_atomic,
    seed_everything,
    write_json_atomic,
)

log = logging.getLogger("fruit-train")
EXIT_USAGE = 2


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fruit-train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model and export it", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    t.add_argument("--data", type=Path, required=True, help="ROOT/<class>/<image>, or a Fruits-360 root with Training/ and Test/")
    t.add_argument("--val-dir", type=Path, help="a separate validation folder (default: carve one from Training)")
    t.add_argument("--test-dir", type=Path, help="folder reported after training (default: DATA/Test when present)")
    t.add_argument("--val-fraction", type=float, default=0.1)
    t.add_argument("--val-stretch", type=int, default=1,
                   help="hold out runs of this many consecutive video frames ([rN_]<frame>_100.jpg), as Fruits-360's "
                        "Test does; 1 = random images. Files not named as frames are split at random")
    t.add_argument("--output-dir", type=Path, default=Path("runs"), help="each run gets a timestamped folder here")
    t.add_argument("--run-name", help="folder name of this run inside --output-dir")
    t.add_argument("--arch", default="resnet18", choices=ARCHES)
    t.add_argument("--weights", type=Path, help="start from this torchvision state dict (never downloaded)")
    t.add_argument("--freeze-epochs", type=int, default=0,
                   help="with --weights: train only the classifier for this many epochs, then unfreeze everything")
    t.add_argument("--input-size", type=int, default=80)
    t.add_argument("--epochs", type=int, default=30)
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--eval-batch-size", type=int, default=256)
    t.add_argument("--lr", type=float, default=3e-3, help="peak learning rate of the one-cycle schedule (AdamW)")
    t.add_argument("--weight-decay", type=float, default=0.05)
    t.add_argument("--label-smoothing", type=float, default=0.1)
    t.add_argument("--patience", type=int, default=6,
                   help="stop after this many epochs without a better validation macro-F1 (--export-epoch best only)")
    t.add_argument("--export-epoch", default="best", choices=("best", "last"),
                   help="best: the epoch with the best validation macro-F1 (then loss), with early stopping; last: "
                        "every epoch of the schedule, the final weights exported (as torchvision's references do)")
    t.add_argument("--no-augment", action="store_true", help="train on plain resized images")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                   help="training forward pass: auto = fp16 AMP on CUDA, bf16 on CPUs with native bf16, else fp32; "
                        "the exported model is always fp32")
    t.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    t.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads (OMP_NUM_THREADS)")
    t.add_argument("--resume", type=Path, help="a run folder or its checkpoint.pt to continue")
    t.add_argument("--tracking-uri", help="MLflow tracking store (default: $MLFLOW_TRACKING_URI, else "
                                          "sqlite:///mlflow.db beside --output-dir)")
    t.add_argument("--no-tracking", action="store_true", help="do not log this run to MLflow")
    t.add_argument("--no-int8", action="store_true",
                   help="do not write model.int8.onnx (the graph precision auto serves on CPUs with VNNI)")
    t.add_argument("--no-progress", action="store_true")

    e = sub.add_parser("evaluate", help="evaluate an exported model on an image folder",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    e.add_argument("model", type=Path, help="a run folder, its model.pt, or a .mar")
    e.add_argument("data", type=Path, help="ROOT/<class>/<image> with class names the model knows")
    e.add_argument("--out", type=Path, help="where reports go (default: RUN/eval-<data folder name>)")
    e.add_argument("--batch-size", type=int, default=256)
    e.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    e.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help=f"auto = {AUTO_PRECISION}")
    e.add_argument("--no-progress", action="store_true")

    x = sub.add_parser("export", help="write a run's model in another format, next to its model.pt",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    x.add_argument("run", type=Path, help="a training run folder")
    x.add_argument("--format", default="onnx", choices=("onnx", "int8"),
                   help="onnx: model.onnx, dynamic batch, the same input and logits as model.pt; int8: "
                        "model.int8.onnx, the served graph quantised on the run's validation images, which "
                        "precision int8 serves (both need the onnx extra)")
    x.add_argument("--calibration-images", type=int, default=CALIBRATION_IMAGES,
                   help="int8: validation images to calibrate on")
    x.add_argument("--no-progress", action="store_true")

    c = sub.add_parser("calibrate", help="fit (again) the uncertainty rule of a trained run: temperature, feature "
                                         "statistics, thresholds", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    c.add_argument("run", type=Path, help="a training run folder (its Training folder must still be where it was)")
    c.add_argument("--eval-batch-size", type=int, default=256)
    c.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    c.add_argument("--no-progress", action="store_true")

    d = sub.add_parser("make-demo-data", help="draw a small synthetic fruit dataset (Training/ and Test/)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d.add_argument("out", type=Path)
    d.add_argument("--train-per-class", type=int, default=40)
    d.add_argument("--test-per-class", type=int, default=15)
    d.add_argument("--seed", type=int, default=0)
    return parser


# --- the data -------------------------------------------------------------------------------------------


@dataclass
class Splits:
    """What a run trains, selects and reports on, decoded once at model resolution."""

    classes: list[str]
    train: datasets.DecodedImages
    val: datasets.DecodedImages
    train_root: Path
    test_root: Path | None
    fingerprint: str


def load_data(args: argparse.Namespace, config: PreprocessConfig) -> Splits:
    train_root, default_test = datasets.resolve_layout(args.data)
    index = datasets.index_image_folder(train_root)
    show = not args.no_progress
    if args.val_dir:
        train = datasets.decode_images(index.paths, index.targets, config, desc="decode train", progress=show)
        val_index = datasets.index_image_folder(args.val_dir, index.classes)
        val = datasets.decode_images(val_index.paths, val_index.targets, config, desc="decode val", progress=show)
    else:
        train_idx, val_idx = datasets.split_of_args(index.paths, index.targets, vars(args))
        train, val = (datasets.decode_images([index.paths[i] for i in idx], [index.targets[i] for i in idx], config,
                                             desc=f"decode {name}", progress=show)
                      for name, idx in (("train", train_idx), ("val", val_idx)))
    if len(train.targets) < args.batch_size:
        raise datasets.DatasetError(f"{len(train.targets)} training images is fewer than one batch ({args.batch_size})")
    log.info("%d classes, %d training and %d validation images from %s", len(index.classes), len(train.targets),
             len(val.targets), train_root)
    return Splits(index.classes, train, val, train_root, args.test_dir or default_test, index.fingerprint())


# --- one epoch, and evaluation ----------------------------------------------------------------------------


@dataclass
class TrainingSetup:
    """The model and everything that updates it; what a checkpoint saves and ``--resume`` restores."""

    model: torch.nn.Module
    criterion: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    generator: torch.Generator
    device: torch.device
    augment: TrainAugment | None
    config: PreprocessConfig
    amp_dtype: torch.dtype | None = None  # None: fp32
    scaler: torch.amp.GradScaler | None = None  # fp16 on CUDA only: bf16 needs no loss scaling

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["generator"])


def make_setup(args: argparse.Namespace, num_classes: int, train_images: int, device: torch.device,
               generator: torch.Generator) -> TrainingSetup:
    config = PreprocessConfig(input_size=args.input_size)
    model = build_model(args.arch, num_classes, args.weights).to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = max(1, train_images // args.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch,
                                                    pct_start=0.25)
    amp_dtype = autocast_dtype(device, args.precision)
    return TrainingSetup(model, torch.nn.CrossEntropyLoss(label_smoothing=args.label_smoothing), optimizer, scheduler,
                         generator, device, None if args.no_augment else TrainAugment(config.mean, config.std), config,
                         amp_dtype, torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None)


def train_one_epoch(setup: TrainingSetup, data: datasets.DecodedImages, epoch: int, args: argparse.Namespace) -> dict:
    model, device = setup.model, setup.device
    model.train()
    n = len(data.targets)
    order = torch.randperm(n, generator=setup.generator)
    steps = n // args.batch_size  # drop the ragged last batch: BatchNorm dislikes tiny ones
    total_loss, correct, seen = 0.0, 0, 0
    start = time.perf_counter()
    for step in progress(range(steps), desc=f"epoch {epoch}", unit="batch", disable=args.no_progress):
        idx = order[step * args.batch_size:(step + 1) * args.batch_size]
        images = data.images[idx].to(device, non_blocking=True)
        targets = data.targets[idx].to(device, non_blocking=True)
        if setup.augment:
            inputs = setup.augment(images, setup.generator)
        else:
            inputs = normalize(images, setup.config.mean, setup.config.std)
        inputs = inputs.contiguous(memory_format=torch.channels_last)  # faster on CPU (oneDNN) and CUDA alike
        with torch.autocast(device.type, dtype=setup.amp_dtype, enabled=setup.amp_dtype is not None):
            logits = model(inputs)
            loss = setup.criterion(logits, targets)
        setup.optimizer.zero_grad(set_to_none=True)
        if setup.scaler is not None:
            setup.scaler.scale(loss).backward()
            setup.scaler.step(setup.optimizer)
            setup.scaler.update()
        else:
            loss.backward()
            setup.optimizer.step()
        setup.scheduler.step()
        total_loss += float(loss.detach()) * len(idx)
        correct += int((logits.argmax(1) == targets).sum())
        seen += len(idx)
    elapsed = time.perf_counter() - start
    return {"train_loss": total_loss / max(seen, 1), "train_acc": correct / max(seen, 1),
            "train_img_per_s": seen / elapsed, "epoch_seconds": elapsed}


def evaluate(classifier: Classifier, decoded: datasets.DecodedImages, progress_bar: bool = False
             ) -> tuple[dict, torch.Tensor]:
    """Metrics of ``classifier`` on cached uint8 images, through the same forward pass as serving."""
    start = time.perf_counter()
    step = classifier.max_batch
    outputs = [classifier.logits_and_features(decoded.images[i:i + step])
               for i in progress(range(0, len(decoded.images), step), desc="evaluate", unit="batch",
                                 disable=not progress_bar)]
    logits, features = torch.cat([o[0] for o in outputs]), torch.cat([o[1] for o in outputs])
    metrics = classification_metrics(logits, decoded.targets, classifier.labels)
    metrics["loss"] = float(torch.nn.functional.cross_entropy(logits, decoded.targets))
    metrics |= answered_metrics(classifier, logits, features, decoded.targets)
    metrics["eval_img_per_s"] = len(decoded.targets) / (time.perf_counter() - start)
    metrics["skipped_files"] = [str(p) for p, _ in decoded.skipped]
    return metrics, logits


def answered_metrics(classifier: Classifier, logits: torch.Tensor, features: torch.Tensor,
                     targets: torch.Tensor) -> dict:
    """What the uncertainty rule does to a labelled set: how much is answered, and how accurate that is."""
    probabilities, _, uncertain = classifier.uncertainty.assess(logits, features)
    return answered_summary(probabilities.argmax(dim=1) == targets, uncertain)


def write_reports(out_dir: Path, name: str, metrics: dict, logits: torch.Tensor, decoded: datasets.DecodedImages,
                  classifier: Classifier) -> None:
    """The pictures: confusion matrix, the most confident mistakes, and the reliability diagram."""
    classes = classifier.labels
    plot_confusion_matrix(metrics["confusion_matrix"], classes, out_dir / "confusion_matrix.png",
                          f"{name}: top-1 {metrics['top1']:.2%}, macro-F1 {metrics['macro_f1']:.4f}")
    plot_confident_errors(decoded.paths, logits, decoded.targets, classes, out_dir / "confident_errors.png")
    plot_reliability(classifier.uncertainty.calibrated(logits), decoded.targets, out_dir / "reliability.png",
                     f"{name}: calibrated with temperature {classifier.uncertainty.temperature:.2f}")


def summary(metrics: dict) -> dict:
    keep = ("images", "top1", "top5", "macro_f1", "macro_precision", "macro_recall", "answered", "accuracy_answered",
            "eval_img_per_s")
    return {k: metrics[k] for k in keep if k in metrics}


# --- a training run, step by step ---------------------------------------------------------------------------


@dataclass
class Progress:
    """Where a run stands: what ``checkpoint.pt`` holds besides the setup's state."""

    model_version: str
    start_epoch: int = 0
    best_f1: float = -1.0
    best_loss: float = float("inf")
    best_epoch: int = -1
    history: list[dict] = field(default_factory=list)
    train_seconds: float = 0.0


def open_run(args: argparse.Namespace) -> tuple[Path, dict | None]:
    """The run folder and, with ``--resume``, the checkpoint to continue from."""
    if args.resume:
        ckpt_path = args.resume / "checkpoint.pt" if args.resume.is_dir() else args.resume
        if not ckpt_path.is_file():
            raise datasets.DatasetError(f"--resume: no checkpoint at {ckpt_path}")
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        log.info("resuming %s from epoch %d", ckpt_path.parent, checkpoint["epoch"] + 1)
        return ckpt_path.parent, checkpoint
    run_dir = args.output_dir / (args.run_name or dt.datetime.now().strftime("%Y%m%d-%H%M%S"))
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir, None


# What a resumed run must be given again as it was: they decide which images it trains on, its schedule and
# which weights it exports. Checked against checkpoint.pt's own record (runs from before it are not checked).
RESUME_OPTIONS = ("val_fraction", "val_stretch", "seed", "epochs", "batch_size", "export_epoch")


def check_resume_options(args: argparse.Namespace, checkpoint: dict) -> None:
    recorded = checkpoint.get("options", {})
    changed = [f"--{k.replace('_', '-')} {recorded[k]} (given {getattr(args, k)})" for k in RESUME_OPTIONS
               if k in recorded and recorded[k] != getattr(args, k)]
    if changed:
        raise datasets.DatasetError("--resume: give the options this run was started with: " + ", ".join(changed))


def fit(setup: TrainingSetup, splits: Splits, run_dir: Path, state: Progress, args: argparse.Namespace,
        tracker: Tracker | NoTracker) -> Progress:
    """Epochs until ``--epochs`` or early stopping; ``best.pt`` keeps the best epoch by validation macro-F1, then loss."""
    validator = wrap_module(setup.model, splits.classes, setup.config, setup.device, args.eval_batch_size)
    start = time.perf_counter()
    for epoch in range(state.start_epoch, args.epochs):
        if args.weights and args.freeze_epochs:
            set_backbone_trainable(setup.model, epoch >= args.freeze_epochs)
        row = {"epoch": epoch, "lr": setup.scheduler.get_last_lr()[0]} | train_one_epoch(setup, splits.train, epoch, args)
        setup.model.eval()
        val, _ = evaluate(validator, splits.val)
        row |= {"val_top1": val["top1"], "val_macro_f1": val["macro_f1"], "val_loss": val["loss"]}
        state.history.append(row)
        # Late in a run validation macro-F1 often ties (at 1.0 on Fruits-360); the lower loss breaks the tie,
        # which favours the later, annealed epochs over the first one that reached the ceiling.
        improved = (val["macro_f1"], -val["loss"]) > (state.best_f1, -state.best_loss)
        if improved:
            state.best_f1, state.best_loss, state.best_epoch = val["macro_f1"], val["loss"], epoch
            save_atomic(setup.model.state_dict(), run_dir / "best.pt")
        save_atomic(setup.state_dict() | {
            "epoch": epoch, "best_f1": state.best_f1, "best_loss": state.best_loss, "best_epoch": state.best_epoch,
            "history": state.history, "model_version": state.model_version, "tracking_run_id": tracker.run_id,
            "options": {k: getattr(args, k) for k in RESUME_OPTIONS}},
            run_dir / "checkpoint.pt")
        tracker.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch)
        log.info("epoch %d: loss %.4f train acc %.4f | val top-1 %.4f macro-F1 %.4f loss %.4f%s | %.0f img/s, %.0f s",
                 epoch, row["train_loss"], row["train_acc"], row["val_top1"], row["val_macro_f1"], row["val_loss"],
                 " *" if improved else "", row["train_img_per_s"], row["epoch_seconds"])
        if args.export_epoch == "best" and epoch - state.best_epoch >= args.patience:
            log.info("early stop: no better validation macro-F1 (or loss at equal F1) for %d epochs", args.patience)
            break
    state.train_seconds = time.perf_counter() - start + sum(r["epoch_seconds"] for r in state.history[:state.start_epoch])
    _write_history(run_dir / "history.csv", state.history)
    return state


def export(setup: TrainingSetup, splits: Splits, run_dir: Path, export_epoch: str) -> float:
    """The best (or with ``--export-epoch last`` the final) epoch's weights as ``model.pt`` (fp32 TorchScript) and
    the labels; returns max |scripted - eager|."""
    if export_epoch == "best":
        setup.model.load_state_dict(torch.load(run_dir / "best.pt", map_location=setup.device, weights_only=True))
    example = normalize(splits.val.images[: min(8, len(splits.val.images))], setup.config.mean, setup.config.std)
    export_diff = export_torchscript(setup.model, run_dir / MODEL_FILE, example)
    log.info("exported TorchScript to %s (max |scripted - eager| = %.2e)", run_dir / MODEL_FILE, export_diff)
    write_json_atomic(run_dir / LABELS_FILE, {str(i): name for i, name in enumerate(splits.classes)})
    return export_diff


OOD_IMAGES = 300  # of each kind, made from validation images


def quantize(run_dir: Path, splits: Splits, args: argparse.Namespace) -> Path | None:
    """``model.int8.onnx`` (``train/quantize.py``), calibrated on validation images and checked on all of them;
    skipped with ``--no-int8`` or without ONNX Runtime (the onnx extra)."""
    if args.no_int8:
        return None
    if importlib.util.find_spec("onnxruntime") is None:
        log.info("int8: ONNX Runtime is not installed (the onnx extra), so no model.int8.onnx; served in bf16/fp32")
        return None
    return export_int8_checked(run_dir, splits.val.images, CALIBRATION_IMAGES)


def export_int8_checked(run_dir: Path, val_images: torch.Tensor, calibration_images: int) -> Path:
    """Quantise ``run_dir``'s model on every k-th of ``val_images`` and say how often int8 keeps fp32's label."""
    step = max(1, len(val_images) // max(1, calibration_images))
    calibration = val_images[::step][:calibration_images]
    path = quantize_run(run_dir, calibration)
    fp32 = load_classifier(run_dir, device="cpu", precision="fp32").logits(val_images).argmax(dim=1)
    int8 = load_classifier(run_dir, device="cpu", precision="int8").logits(val_images).argmax(dim=1)
    agreement = float((fp32 == int8).double().mean()) if len(val_images) else float("nan")
    print(f"wrote {path}: calibrated on {len(calibration)} validation images; the same top-1 label as fp32 on "
          f"{agreement:.3%} of the {len(val_images)} validation images")
    return path


def calibrate(run_dir: Path, splits: Splits, args: argparse.Namespace, metadata: dict) -> dict:
    """Fit the uncertainty rule on the exported model (``train/uncertainty.py``), check it on out-of-distribution
    images made from validation images (``train/ood.py``), picture both, and record them in ``metadata.json``."""
    classifier = load_classifier(run_dir, device=select_device(args.device), precision="fp32",
                                 max_batch=args.eval_batch_size)
    rule, section, scores = fit_rule(classifier, splits.train, splits.val, run_dir, args.seed,
                                     holdout_frames(metadata["training"]))
    classifier.uncertainty = rule
    rng = random.Random(args.seed)
    originals = [decode_image(p.read_bytes(), classifier.config.max_pixels)
                 for p in rng.sample(splits.val.paths, min(OOD_IMAGES, len(splits.val.paths)))]
    rates = {}
    for name, images in out_of_distribution(originals, len(originals), seed=args.seed).items():
        batch = torch.stack([to_uint8_tensor(resize_and_crop(im, classifier.config.input_size)) for im in images])
        prediction = classifier.predict(batch)
        scores[name] = prediction.distances
        rates[name] = {"images": len(images), "flagged": round(float(prediction.uncertain.double().mean()), 4)}
    section["out_of_distribution"] = rates
    plot_score_histograms(scores, rule.max_distance, run_dir / "uncertainty_scores.png",
                          "validation vs images made to be out of distribution")
    metadata["uncertainty"] = section
    write_json_atomic(run_dir / METADATA_FILE, metadata)
    log.info("uncertainty: temperature %.3f, uncertain below confidence %.2f or beyond distance %.4f; validation "
             "answered %.2f%%; flagged: %s", section["temperature"], section["min_confidence"],
             section["max_distance"], 100 * section["validation"]["answered"],
             ", ".join(f"{k} {v['flagged']:.1%}" for k, v in rates.items()))
    augmented = section["augmented"]
    if not augmented["accuracy_answered"] >= ANSWERED_ACCURACY:  # NaN (nothing answered) warns too
        log.warning("uncertainty: no confidence threshold makes this model's answers %.1f%% right on augmented "
                    "validation (%.2f%% at %.2f): it is too weak to answer much; train longer", 100 * ANSWERED_ACCURACY,
                    100 * augmented["accuracy_answered"], section["min_confidence"])
    return metadata


def report(run_dir: Path, splits: Splits, args: argparse.Namespace, metadata: dict) -> dict:
    """Metrics and pictures from the exported model as it is served (``load_classifier``, fp32 here so the reported
    figures are the exported model's own), on validation and, when there is one, Test."""
    classifier = load_classifier(run_dir, device=select_device(args.device), precision="fp32",
                                 max_batch=args.eval_batch_size)
    val, _ = evaluate(classifier, splits.val)
    metrics = {"validation": val}
    name, report_set = "validation", splits.val
    if splits.test_root is not None:
        test_index = datasets.index_image_folder(splits.test_root, splits.classes)
        report_set = datasets.decode_images(test_index.paths, test_index.targets, classifier.config, desc="decode test",
                                            progress=not args.no_progress)
        name = "test"
    metrics[name], logits = evaluate(classifier, report_set, not args.no_progress)
    write_json_atomic(run_dir / "metrics.json", metrics)
    write_json_atomic(run_dir / METADATA_FILE, metadata | {"metrics": {split: summary(m) for split, m in metrics.items()}})
    write_reports(run_dir, f"{args.arch} on {name}", metrics[name], logits, report_set, classifier)
    return metrics


def write_metadata(run_dir: Path, args: argparse.Namespace, setup: TrainingSetup, splits: Splits, state: Progress,
                   export_diff: float, tracker: Tracker | NoTracker) -> dict:
    """``metadata.json``: what the model expects and how it was made. Written before the reports, which load the
    run as it is served; ``report`` adds the metrics."""
    metadata = {
        "model_version": state.model_version,
        "arch": args.arch,
        "num_classes": len(splits.classes),
        **setup.config.to_metadata(),
        "dataset": {"train_root": str(splits.train_root), "fingerprint": splits.fingerprint,
                    "train_images": len(splits.train.targets), "val_images": len(splits.val.targets),
                    "skipped_files": len(splits.train.skipped) + len(splits.val.skipped),
                    "test_root": str(splits.test_root) if splits.test_root else None},
        "training": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "command"},
        "tracking": {"uri": tracker.uri, "run_id": tracker.run_id} if tracker.run_id else None,
        "epochs_run": len(state.history), "best_epoch": state.best_epoch,
        "exported_epoch": state.best_epoch if args.export_epoch == "best" else len(state.history) - 1,
        "train_seconds": round(state.train_seconds, 1),
        "device": str(setup.device), "torch_threads": torch.get_num_threads(),
        "train_autocast": str(setup.amp_dtype).removeprefix("torch.") if setup.amp_dtype else "float32",
        "export_max_abs_diff": export_diff,
        "packages": package_versions(), "git_commit": git_commit(),
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    write_json_atomic(run_dir / METADATA_FILE, metadata)
    return metadata


def provenance_tags(args: argparse.Namespace, splits: Splits, setup: TrainingSetup, model_version: str) -> dict:
    """What MLflow's run list should show about where a model came from."""
    tags = {f"package.{name}": str(version) for name, version in package_versions().items()}
    return tags | {"git_commit": git_commit() or "unknown", "dataset_fingerprint": splits.fingerprint,
                   "dataset_root": str(splits.train_root), "model_version": model_version,
                   "precision": str(setup.amp_dtype).removeprefix("torch.") if setup.amp_dtype else "float32"}


def run_training(args: argparse.Namespace) -> Path:
    torch.set_num_threads(max(1, args.threads))
    device = select_device(args.device)
    generator = seed_everything(args.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    config = PreprocessConfig(input_size=args.input_size)

    datasets.find_classes(datasets.resolve_layout(args.data)[0])  # a bad --data fails before anything else
    tracker = start_tracking(resolve_tracking_uri(args.tracking_uri, args.output_dir), not args.no_tracking)
    splits = load_data(args, config)  # before the run folder exists: a bad --data leaves nothing behind
    run_dir, checkpoint = open_run(args)
    setup = make_setup(args, len(splits.classes), len(splits.train.targets), device, generator)
    state = Progress(dt.datetime.now().strftime("%Y%m%d.%H%M%S"))
    if checkpoint is not None:
        check_resume_options(args, checkpoint)
        setup.load_state_dict(checkpoint)
        state = Progress(checkpoint["model_version"], checkpoint["epoch"] + 1, checkpoint["best_f1"],
                         checkpoint.get("best_loss", float("inf")), checkpoint["best_epoch"], checkpoint["history"])
    tracker.start(run_dir.name, vars(args) | {"command": "train"}, provenance_tags(args, splits, setup, state.model_version),
                  resume_run_id=checkpoint.get("tracking_run_id") if checkpoint else None)
    try:
        state = fit(setup, splits, run_dir, state, args, tracker)
        export_diff = export(setup, splits, run_dir, args.export_epoch)
        metadata = write_metadata(run_dir, args, setup, splits, state, export_diff, tracker)
        metadata = calibrate(run_dir, splits, args, metadata)
        quantize(run_dir, splits, args)
        metrics = report(run_dir, splits, args, metadata)
    except KeyboardInterrupt:
        tracker.fail("KILLED")
        raise
    except Exception:
        tracker.fail()
        raise
    tracker.log_metrics({f"{split}_{key}": value for split, m in metrics.items() for key, value in summary(m).items()
                         if key != "images"}, step=len(state.history))
    registered = tracker.finish(run_dir)
    if registered is not None:
        write_json_atomic(run_dir / METADATA_FILE, load_metadata(run_dir / METADATA_FILE) | {
            "registry": {"name": registered.name, "version": registered.version, "alias": CANDIDATE}})
        print(f"MLflow run {tracker.run_id} at {tracker.uri}; registered {registered.name} version "
              f"{registered.version} as '{CANDIDATE}'")

    name = "test" if "test" in metrics else "validation"
    final = metrics[name]
    print(f"artifacts: {run_dir.resolve()}")
    print(f"model version {state.model_version}; {name}: top-1 {final['top1']:.4f}, top-5 {final['top5']:.4f}, "
          f"macro-F1 {final['macro_f1']:.4f} on {final['images']} images; trained {len(state.history)} epochs in "
          f"{state.train_seconds / 60:.1f} min")
    return run_dir


def _write_history(path: Path, history: list[dict]) -> None:
    if not history:
        return
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as handle:
        # rows of a run resumed from an older checkpoint may lack newer columns (val_loss)
        fieldnames = list(dict.fromkeys(key for row in history for key in row))
        writer = csv.DictWriter(handle, fieldnames=fieldnames, restval="")
        writer.writeheader()
        writer.writerows(history)
    tmp.replace(path)


def run_evaluation(args: argparse.Namespace) -> dict:
    classifier = load_classifier(args.model, device=select_device(args.device), precision=args.precision,
                                 max_batch=args.batch_size)
    index = datasets.index_image_folder(args.data, classifier.labels)
    decoded = datasets.decode_images(index.paths, index.targets, classifier.config, desc="decode",
                                     progress=not args.no_progress)
    metrics, logits = evaluate(classifier, decoded, not args.no_progress)
    metrics["precision"] = classifier.precision
    # by default beside the model: in its run folder, or in the folder of its model.pt or .mar
    out = args.out or (args.model if args.model.is_dir() else args.model.parent) / f"eval-{args.data.resolve().name}"
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "metrics.json", metrics)
    write_reports(out, f"{args.data.name} ({classifier.precision})", metrics, logits, decoded, classifier)
    print(f"reports: {out.resolve()}")
    print(f"top-1 {metrics['top1']:.4f}, top-5 {metrics['top5']:.4f}, macro-F1 {metrics['macro_f1']:.4f} "
          f"on {metrics['images']} images in {classifier.precision} ({len(decoded.skipped)} skipped)")
    return metrics


def run_calibration(args: argparse.Namespace) -> dict:
    """The uncertainty fit of ``train`` for a run that exists: older runs get it, a run's thresholds can be refitted."""
    run = require_files(args.run, "a complete training run")
    metadata = load_metadata(run / METADATA_FILE)
    classes = load_labels(run / LABELS_FILE)
    config = PreprocessConfig.from_metadata(metadata)
    train_items, val_items = datasets.splits_of_run(metadata, classes)
    decoded = [datasets.decode_images([p for p, _ in items], [t for _, t in items], config, desc=f"decode {name}",
                                      progress=not args.no_progress)
               for name, items in (("train", train_items), ("val", val_items))]
    splits = Splits(classes, decoded[0], decoded[1], Path(metadata["dataset"]["train_root"]), None,
                    metadata["dataset"].get("fingerprint", ""))
    args.seed = int(metadata["training"].get("seed", 0))
    metadata = calibrate(run, splits, args, metadata)
    fitted = {k: metadata["uncertainty"][k] for k in ("temperature", "min_confidence", "max_distance")}
    print(f"uncertainty fitted for {run}: {json.dumps(fitted)}")
    return metadata


def run_export(args: argparse.Namespace) -> Path:
    return export_int8(args) if args.format == "int8" else export_plain_onnx(args)


def export_int8(args: argparse.Namespace) -> Path:
    """``model.int8.onnx`` for a trained run (one trained before int8 existed, or with ``--no-int8``)."""
    run = require_files(args.run, "a complete training run")
    metadata = load_metadata(run / METADATA_FILE)
    classes = load_labels(run / LABELS_FILE)
    items = datasets.validation_of_run(metadata, classes)
    val = datasets.decode_images([p for p, _ in items], [t for _, t in items], PreprocessConfig.from_metadata(metadata),
                                 desc="decode val", progress=not args.no_progress)
    return export_int8_checked(run, val.images, args.calibration_images)


def export_plain_onnx(args: argparse.Namespace) -> Path:
    """``model.onnx`` beside ``model.pt``, checked against it with ONNX Runtime on random inputs."""
    try:
        import onnxruntime
    except ImportError:
        raise ValueError("ONNX export needs the onnx extra: pip install 'fruitserve[onnx]'") from None
    run = require_files(args.run, "a complete training run")
    metadata = load_metadata(run / METADATA_FILE)
    scripted = load_torchscript(run / MODEL_FILE, torch.device("cpu"))
    model = eager_from_torchscript(scripted, metadata["arch"], int(metadata["num_classes"]))
    size = int(metadata["input_size"])
    path = run / "model.onnx"
    export_onnx(model, path, torch.zeros(2, 3, size, size))
    images = torch.randn(5, 3, size, size, generator=torch.Generator().manual_seed(0))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    onnx_logits = torch.from_numpy(session.run(["logits"], {"images": images.numpy()})[0])
    with torch.inference_mode():
        difference = float((onnx_logits - scripted(images)).abs().max())
    print(f"wrote {path} (max |onnx - torchscript| logit on random inputs: {difference:.2e})")
    return path


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    args = get_args_parser().parse_args(argv)
    try:
        if args.command == "make-demo-data":
            out = make_demo_data(args.out, args.train_per_class, args.test_per_class, args.seed)
            print(f"synthetic dataset: {out.resolve()}")
        elif args.command == "evaluate":
            run_evaluation(args)
        elif args.command == "export":
            run_export(args)
        elif args.command == "calibrate":
            run_calibration(args)
        else:
            run_training(args)
    except (datasets.DatasetError, ModelDirError, TrackingError, ValueError) as exc:
        print(f"fruit-train: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("fruit-train: interrupted; rerun with --resume RUN_DIR to continue", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
