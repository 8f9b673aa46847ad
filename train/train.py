"""``fruit-train``: train a torchvision ResNet on an image folder, evaluate it, export TorchScript.

    fruit-train make-demo-data data/demo
    fruit-train train --data data/demo --epochs 8
    fruit-train train --data ../shared/data/fruits-360          # Training/ + Test/
    fruit-train evaluate runs/<run>/model.pt ../shared/data/fruits-360/Test

Model selection (early stopping, best checkpoint) uses a validation split carved from
Training; ``Test/`` is only ever reported, after training is over.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import logging
import sys
import time
from pathlib import Path

import torch
from fruitserve.handler.artifacts import (
    LABELS_FILE,
    METADATA_FILE,
    MODEL_FILE,
    ModelDirError,
    load_for_inference,
    load_labels,
    load_metadata,
)
from fruitserve.handler.preprocessing import PreprocessConfig, normalize
from tqdm import tqdm

from . import data as datasets
from .model import ARCHES, build_model, export_torchscript, set_backbone_trainable
from .presets import TrainAugment
from .reports import classification_metrics, plot_confident_errors, plot_confusion_matrix
from .synthetic import make_demo_data
from .utils import autocast_dtype, git_commit, package_versions, save_atomic, seed_everything, select_device, write_json_atomic

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
    t.add_argument("--patience", type=int, default=6, help="stop after this many epochs without a better validation macro-F1")
    t.add_argument("--no-augment", action="store_true", help="train on plain resized images")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                   help="training forward pass: auto = fp16 AMP on CUDA, bf16 on CPUs with native bf16, else fp32; "
                        "evaluation and the exported model are always fp32")
    t.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    t.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads (OMP_NUM_THREADS)")
    t.add_argument("--resume", type=Path, help="a run folder or its checkpoint.pt to continue")
    t.add_argument("--no-progress", action="store_true")

    e = sub.add_parser("evaluate", help="evaluate an exported model on an image folder",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    e.add_argument("model", type=Path, help="model.pt (with index_to_name.json and metadata.json beside it) or its run folder")
    e.add_argument("data", type=Path, help="ROOT/<class>/<image> with class names the model knows")
    e.add_argument("--out", type=Path, help="where reports go (default: MODEL_DIR/eval-<data folder name>)")
    e.add_argument("--batch-size", type=int, default=256)
    e.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    e.add_argument("--no-progress", action="store_true")

    d = sub.add_parser("make-demo-data", help="draw a small synthetic fruit dataset (Training/ and Test/)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d.add_argument("out", type=Path)
    d.add_argument("--train-per-class", type=int, default=40)
    d.add_argument("--test-per-class", type=int, default=15)
    d.add_argument("--seed", type=int, default=0)
    return parser


def train_one_epoch(
    model: torch.nn.Module,
    criterion: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    train: datasets.DecodedImages,
    augment: TrainAugment | None,
    config: PreprocessConfig,
    args: argparse.Namespace,
    epoch: int,
    generator: torch.Generator,
    device: torch.device,
    scaler: torch.amp.GradScaler | None,
    amp_dtype: torch.dtype | None = None,
) -> dict:
    model.train()
    n = len(train.targets)
    order = torch.randperm(n, generator=generator)
    steps = n // args.batch_size  # drop the ragged last batch: BatchNorm dislikes tiny ones
    total_loss, correct, seen = 0.0, 0, 0
    start = time.perf_counter()
    bar = tqdm(range(steps), desc=f"epoch {epoch}", unit="batch", leave=False, disable=args.no_progress)
    for step in bar:
        idx = order[step * args.batch_size:(step + 1) * args.batch_size]
        images = train.images[idx].to(device, non_blocking=True)
        targets = train.targets[idx].to(device, non_blocking=True)
        inputs = augment(images, generator) if augment else normalize(images, config.mean, config.std)
        inputs = inputs.contiguous(memory_format=torch.channels_last)  # faster on CPU (oneDNN) and CUDA alike
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(inputs)
            loss = criterion(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        scheduler.step()
        total_loss += float(loss.detach()) * len(idx)
        correct += int((logits.argmax(1) == targets).sum())
        seen += len(idx)
        elapsed = time.perf_counter() - start
        bar.set_postfix(loss=f"{total_loss / seen:.3f}", acc=f"{correct / seen:.3f}", img_s=f"{seen / elapsed:.0f}")
    elapsed = time.perf_counter() - start
    return {"train_loss": total_loss / max(seen, 1), "train_acc": correct / max(seen, 1),
            "train_img_per_s": seen / elapsed, "epoch_seconds": elapsed}


@torch.inference_mode()
def predict(model: torch.nn.Module, images: torch.Tensor, config: PreprocessConfig, batch_size: int,
            device: torch.device, progress: bool = False) -> torch.Tensor:
    """Logits for cached uint8 images: the same ``normalize`` the handler applies."""
    model.eval()
    outputs = []
    for start in tqdm(range(0, len(images), batch_size), desc="evaluate", unit="batch", leave=False,
                      disable=not progress):
        batch = normalize(images[start:start + batch_size].to(device), config.mean, config.std)
        if device.type == "cuda":
            batch = batch.contiguous(memory_format=torch.channels_last)
        outputs.append(model(batch).float().cpu())
    return torch.cat(outputs)


def evaluate(model: torch.nn.Module, decoded: datasets.DecodedImages, classes: list[str], config: PreprocessConfig,
             batch_size: int, device: torch.device, progress: bool = False) -> tuple[dict, torch.Tensor]:
    start = time.perf_counter()
    logits = predict(model, decoded.images, config, batch_size, device, progress)
    metrics = classification_metrics(logits, decoded.targets, classes)
    metrics["loss"] = float(torch.nn.functional.cross_entropy(logits, decoded.targets))
    metrics["eval_img_per_s"] = len(decoded.targets) / (time.perf_counter() - start)
    metrics["skipped_files"] = [str(p) for p, _ in decoded.skipped]
    return metrics, logits


def write_reports(out_dir: Path, name: str, metrics: dict, logits: torch.Tensor, decoded: datasets.DecodedImages,
                  classes: list[str]) -> None:
    plot_confusion_matrix(metrics["confusion_matrix"], classes, out_dir / "confusion_matrix.png",
                          f"{name}: top-1 {metrics['top1']:.2%}, macro-F1 {metrics['macro_f1']:.4f}")
    plot_confident_errors(decoded.paths, logits, decoded.targets, classes, out_dir / "confident_errors.png")


def summary(metrics: dict) -> dict:
    keep = ("images", "top1", "top5", "macro_f1", "macro_precision", "macro_recall", "eval_img_per_s")
    return {k: metrics[k] for k in keep if k in metrics}


def _resolve_checkpoint(path: Path) -> Path:
    return path / "checkpoint.pt" if path.is_dir() else path


def run_training(args: argparse.Namespace) -> Path:
    torch.set_num_threads(max(1, args.threads))
    device = select_device(args.device)
    generator = seed_everything(args.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    config = PreprocessConfig(input_size=args.input_size)

    checkpoint = None
    if args.resume:
        ckpt_path = _resolve_checkpoint(args.resume)
        if not ckpt_path.is_file():
            raise datasets.DatasetError(f"--resume: no checkpoint at {ckpt_path}")
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        run_dir = ckpt_path.parent
        log.info("resuming %s from epoch %d", run_dir, checkpoint["epoch"] + 1)
    else:
        run_name = args.run_name or dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        run_dir = args.output_dir / run_name
        run_dir.mkdir(parents=True, exist_ok=True)
    model_version = checkpoint["model_version"] if checkpoint else dt.datetime.now().strftime("%Y%m%d.%H%M%S")

    train_root, default_test = datasets.resolve_layout(args.data)
    test_root = args.test_dir or default_test
    train_index = datasets.index_image_folder(train_root)
    classes = train_index.classes
    if args.val_dir:
        train_idx, val_idx = list(range(len(train_index.paths))), None
    else:
        train_idx, val_idx = datasets.stratified_split(train_index.targets, args.val_fraction, args.seed)
    pick = lambda idx: ([train_index.paths[i] for i in idx], [train_index.targets[i] for i in idx])  # noqa: E731
    progress = not args.no_progress
    train_set = datasets.decode_images(*pick(train_idx), config, desc="decode train", progress=progress)
    if val_idx is None:
        val_index = datasets.index_image_folder(args.val_dir, classes)
        val_set = datasets.decode_images(val_index.paths, val_index.targets, config, desc="decode val", progress=progress)
    else:
        val_set = datasets.decode_images(*pick(val_idx), config, desc="decode val", progress=progress)
    log.info("%d classes, %d training and %d validation images from %s", len(classes), len(train_set.targets),
             len(val_set.targets), train_root)

    model = build_model(args.arch, len(classes), args.weights).to(device, memory_format=torch.channels_last)
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = max(1, len(train_set.targets) // args.batch_size)
    if len(train_set.targets) < args.batch_size:
        raise datasets.DatasetError(f"{len(train_set.targets)} training images is fewer than one batch ({args.batch_size})")
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch,
                                                    pct_start=0.25)
    amp_dtype = autocast_dtype(device, args.precision)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None  # bf16 needs no loss scaling
    augment = None if args.no_augment else TrainAugment(config.mean, config.std)

    start_epoch, best_f1, best_loss, best_epoch, history = 0, -1.0, float("inf"), -1, []
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        generator.set_state(checkpoint["generator"])
        start_epoch, best_f1, best_epoch = checkpoint["epoch"] + 1, checkpoint["best_f1"], checkpoint["best_epoch"]
        best_loss = checkpoint.get("best_loss", float("inf"))
        history = checkpoint["history"]

    train_start = time.perf_counter()
    for epoch in range(start_epoch, args.epochs):
        if args.weights and args.freeze_epochs:
            set_backbone_trainable(model, epoch >= args.freeze_epochs)
        row = {"epoch": epoch, "lr": scheduler.get_last_lr()[0]}
        row |= train_one_epoch(model, criterion, optimizer, scheduler, train_set, augment, config, args, epoch,
                               generator, device, scaler, amp_dtype)
        val_metrics, _ = evaluate(model, val_set, classes, config, args.eval_batch_size, device)
        row |= {"val_top1": val_metrics["top1"], "val_macro_f1": val_metrics["macro_f1"], "val_loss": val_metrics["loss"]}
        history.append(row)
        # Late in a run validation macro-F1 often ties (at 1.0 on Fruits-360); the lower loss breaks the tie,
        # which favours the later, annealed epochs over the first one that reached the ceiling.
        improved = (val_metrics["macro_f1"], -val_metrics["loss"]) > (best_f1, -best_loss)
        if improved:
            best_f1, best_loss, best_epoch = val_metrics["macro_f1"], val_metrics["loss"], epoch
            save_atomic(model.state_dict(), run_dir / "best.pt")
        save_atomic({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "generator": generator.get_state(), "epoch": epoch,
                     "best_f1": best_f1, "best_loss": best_loss, "best_epoch": best_epoch, "history": history,
                     "model_version": model_version}, run_dir / "checkpoint.pt")
        log.info("epoch %d: loss %.4f train acc %.4f | val top-1 %.4f macro-F1 %.4f loss %.4f%s | %.0f img/s, %.0f s",
                 epoch, row["train_loss"], row["train_acc"], row["val_top1"], row["val_macro_f1"], row["val_loss"],
                 " *" if improved else "",
                 row["train_img_per_s"], row["epoch_seconds"])
        if epoch - best_epoch >= args.patience:
            log.info("early stop: no better validation macro-F1 (or loss at equal F1) for %d epochs", args.patience)
            break
    train_seconds = time.perf_counter() - train_start + sum(r["epoch_seconds"] for r in history[:start_epoch])
    _write_history(run_dir / "history.csv", history)

    model.load_state_dict(torch.load(run_dir / "best.pt", map_location=device, weights_only=True))
    example = normalize(val_set.images[: min(8, len(val_set.images))], config.mean, config.std)
    export_diff = export_torchscript(model, run_dir / MODEL_FILE, example)
    log.info("exported TorchScript to %s (max |scripted - eager| = %.2e)", run_dir / MODEL_FILE, export_diff)
    write_json_atomic(run_dir / LABELS_FILE, {str(i): name for i, name in enumerate(classes)})

    # Reports come from the exported TorchScript, the artifact that is actually served.
    scripted = load_for_inference(run_dir / MODEL_FILE, device)
    val_metrics, _ = evaluate(scripted, val_set, classes, config, args.eval_batch_size, device)
    metrics = {"validation": val_metrics}
    report_name, report_set = "validation", val_set
    if test_root is not None:
        test_index = datasets.index_image_folder(test_root, classes)
        report_set = datasets.decode_images(test_index.paths, test_index.targets, config, desc="decode test",
                                            progress=progress)
        report_name = "test"
    report_metrics, report_logits = evaluate(scripted, report_set, classes, config, args.eval_batch_size, device,
                                             progress)
    metrics[report_name] = report_metrics
    write_json_atomic(run_dir / "metrics.json", metrics)
    write_reports(run_dir, f"{args.arch} on {report_name}", report_metrics, report_logits, report_set, classes)

    metadata = {
        "model_version": model_version,
        "arch": args.arch,
        "num_classes": len(classes),
        **config.to_metadata(),
        "dataset": {"train_root": str(train_root), "fingerprint": train_index.fingerprint(),
                    "train_images": len(train_set.targets), "val_images": len(val_set.targets),
                    "skipped_files": len(train_set.skipped) + len(val_set.skipped),
                    "test_root": str(test_root) if test_root else None},
        "training": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "command"},
        "epochs_run": len(history), "best_epoch": best_epoch, "train_seconds": round(train_seconds, 1),
        "device": str(device), "torch_threads": torch.get_num_threads(),
        "train_autocast": str(amp_dtype).removeprefix("torch.") if amp_dtype else "float32",
        "export_max_abs_diff": export_diff,
        "packages": package_versions(), "git_commit": git_commit(),
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "metrics": {"validation": summary(val_metrics), report_name: summary(report_metrics)},
    }
    write_json_atomic(run_dir / METADATA_FILE, metadata)
    print(f"artifacts: {run_dir.resolve()}")
    print(f"model version {metadata['model_version']}; {report_name}: top-1 {report_metrics['top1']:.4f}, "
          f"top-5 {report_metrics['top5']:.4f}, macro-F1 {report_metrics['macro_f1']:.4f} "
          f"on {report_metrics['images']} images; trained {len(history)} epochs in {train_seconds / 60:.1f} min")
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
    device = select_device(args.device)
    model_path = args.model / MODEL_FILE if args.model.is_dir() else args.model
    model_dir = model_path.parent
    for needed in (model_path, model_dir / LABELS_FILE, model_dir / METADATA_FILE):
        if not needed.is_file():
            raise ModelDirError(f"missing {needed}: evaluate needs model.pt, index_to_name.json and metadata.json")
    classes = load_labels(model_dir / LABELS_FILE)
    config = PreprocessConfig.from_metadata(load_metadata(model_dir / METADATA_FILE))
    index = datasets.index_image_folder(args.data, classes)
    decoded = datasets.decode_images(index.paths, index.targets, config, desc="decode", progress=not args.no_progress)
    model = load_for_inference(model_path, device)
    metrics, logits = evaluate(model, decoded, classes, config, args.batch_size, device, not args.no_progress)
    out = args.out or model_dir / f"eval-{args.data.resolve().name}"
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "metrics.json", metrics)
    write_reports(out, f"{args.data.name}", metrics, logits, decoded, classes)
    print(f"reports: {out.resolve()}")
    print(f"top-1 {metrics['top1']:.4f}, top-5 {metrics['top5']:.4f}, macro-F1 {metrics['macro_f1']:.4f} "
          f"on {metrics['images']} images ({len(decoded.skipped)} skipped)")
    return metrics


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    args = get_args_parser().parse_args(argv)
    try:
        if args.command == "make-demo-data":
            out = make_demo_data(args.out, args.train_per_class, args.test_per_class, args.seed)
            print(f"synthetic dataset: {out.resolve()}")
        elif args.command == "evaluate":
            run_evaluation(args)
        else:
            run_training(args)
    except (datasets.DatasetError, ModelDirError, ValueError) as exc:
        print(f"fruit-train: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("fruit-train: interrupted; rerun with --resume RUN_DIR to continue", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
