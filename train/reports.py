"""Metrics and pictures for a trained model: accuracy, macro-F1, confusion matrix, worst mistakes."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch


def confusion_matrix(targets: torch.Tensor, preds: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Rows are true classes, columns predicted ones."""
    index = targets.to(torch.int64) * num_classes + preds.to(torch.int64)
    return torch.bincount(index, minlength=num_classes * num_classes).view(num_classes, num_classes)


def classification_metrics(logits: torch.Tensor, targets: torch.Tensor, classes: Sequence[str]) -> dict:
    k = min(5, len(classes))
    metrics = label_metrics(targets, logits.argmax(dim=1), classes)
    top5 = (logits.topk(k, dim=1).indices == targets.view(-1, 1)).any(dim=1).double().mean()
    return {"images": metrics["images"], "top1": metrics["top1"], "top5": float(top5)} | metrics


def label_metrics(targets: torch.Tensor, preds: torch.Tensor, classes: Sequence[str]) -> dict:
    """Accuracy, macro and per-class precision/recall/F1 and the confusion matrix from predicted indices."""
    num_classes = len(classes)
    cm = confusion_matrix(targets, preds, num_classes).double()
    tp = cm.diag()
    support = cm.sum(dim=1)
    predicted = cm.sum(dim=0)
    precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), torch.zeros_like(tp))
    recall = torch.where(support > 0, tp / support.clamp(min=1), torch.zeros_like(tp))
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp(min=1e-12),
                     torch.zeros_like(tp))
    present = support > 0  # classes absent from this split do not drag macro-F1 down
    return {
        "images": int(targets.numel()),
        "top1": float(tp.sum() / cm.sum()),
        "macro_f1": float(f1[present].mean()),
        "macro_precision": float(precision[present].mean()),
        "macro_recall": float(recall[present].mean()),
        "per_class": {
            name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                   "support": int(support[i])}
            for i, name in enumerate(classes)
        },
        "confusion_matrix": cm.to(torch.int64).tolist(),
    }


def plot_confusion_matrix(cm: Sequence[Sequence[int]], classes: Sequence[str], path: Path, title: str) -> None:
    """Row-normalised, log-coloured so that a handful of errors among hundreds still shows at 141 classes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    matrix = torch.tensor(cm, dtype=torch.float64)
    rows = matrix.sum(dim=1, keepdim=True).clamp(min=1)
    norm = (matrix / rows).numpy()
    n = len(classes)
    side = max(6.0, n * 0.16)
    font = 9 if n <= 30 else max(3.5, 8 - n / 30)
    fig, ax = plt.subplots(figsize=(side + 2, side + 1), dpi=110)
    im = ax.imshow(norm, cmap="viridis", norm=LogNorm(vmin=1e-3, vmax=1.0), interpolation="nearest")
    ax.set_xticks(range(n), labels=classes, rotation=90, fontsize=font)
    ax.set_yticks(range(n), labels=classes, fontsize=font)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if n <= 30:
        for i in range(n):
            for j in range(n):
                if matrix[i, j] > 0:
                    ax.text(j, i, int(matrix[i, j]), ha="center", va="center", fontsize=font - 1,
                            color="white" if norm[i, j] < 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.03, label="fraction of the true class (log)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_confident_errors(
    paths: Sequence[Path], logits: torch.Tensor, targets: torch.Tensor, classes: Sequence[str], path: Path,
    count: int = 24,
) -> int:
    """A grid of the misclassified images the model was surest of; returns how many it shows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    probs = torch.softmax(logits.float(), dim=1)
    conf, preds = probs.max(dim=1)
    wrong = (preds != targets).nonzero().flatten()
    order = wrong[conf[wrong].argsort(descending=True)][:count].tolist()
    cols = 6
    rows = max(1, math.ceil(len(order) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 2.4, rows * 2.7), dpi=100, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, order, strict=False):
        with Image.open(paths[i]) as image:
            ax.imshow(image.convert("RGB"))
        ax.set_title(f"true: {classes[targets[i]]}\npred: {classes[preds[i]]}\n{conf[i]:.1%}", fontsize=7)
    if not order:
        axes.flat[0].text(0.5, 0.5, "no misclassified images", ha="center", va="center")
    fig.suptitle("most confidently wrong predictions")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return len(order)


def plot_reliability(probabilities: torch.Tensor, targets: torch.Tensor, path: Path, title: str,
                     bins: int = 15) -> None:
    """Accuracy against calibrated confidence, bin by bin (the diagonal is perfect calibration), with how many
    images fall in each bin underneath."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    confidence, predicted = probabilities.max(dim=1)
    correct = (predicted == targets).double()
    edges = torch.linspace(0, 1, bins + 1)
    centres, accuracy, mean_conf, counts = [], [], [], []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        inside = (confidence > lo) & (confidence <= hi)
        counts.append(int(inside.sum()))
        if inside.any():
            centres.append(float((lo + hi) / 2))
            accuracy.append(float(correct[inside].mean()))
            mean_conf.append(float(confidence[inside].mean()))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(5.5, 6.5), dpi=110, height_ratios=(3, 1), sharex=True)
    top.plot([0, 1], [0, 1], "--", color="grey", label="perfectly calibrated")
    top.plot(mean_conf, accuracy, "o-", label="this model")
    top.set_ylabel("accuracy")
    top.set_title(title)
    top.legend(loc="upper left")
    bottom.bar(((edges[:-1] + edges[1:]) / 2).numpy(), counts, width=1 / bins * 0.9)
    bottom.set_yscale("log")
    bottom.set_xlabel("calibrated confidence")
    bottom.set_ylabel("images")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_score_histograms(scores: dict[str, torch.Tensor], threshold: float, path: Path, title: str) -> None:
    """The out-of-distribution score of each set of images, and the threshold above which answers are flagged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finite = torch.cat([s[torch.isfinite(s)] for s in scores.values()]).clamp(min=1e-4)
    bins = torch.logspace(math.log10(float(finite.min())), math.log10(float(finite.max())), 60).numpy()
    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=110)
    for name, values in scores.items():
        flagged = float((values > threshold).double().mean())
        ax.hist(values.clamp(min=1e-4).numpy(), bins=bins, histtype="step", linewidth=1.6, density=True,
                label=f"{name} ({len(values)}): {flagged:.1%} beyond")
    ax.axvline(threshold, color="black", linestyle="--", label=f"max_distance {threshold:.4f}")
    ax.set_xscale("log")
    ax.set_xlabel("cosine distance to the nearest training image of the predicted class")
    ax.set_ylabel("density")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
