"""Class probabilities to the JSON answer every client sees (TorchServe, KServe, fruit-batch's CSV)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

DEFAULT_TOP_K = 5


def clamp_top_k(requested: int | None, num_classes: int, default: int = DEFAULT_TOP_K) -> int:
    """``min(requested, classes)``, at least 1: asking for more classes than exist is not an error."""
    k = default if requested is None else int(requested)
    return max(1, min(k, num_classes))


def format_predictions(probs: torch.Tensor, labels: Sequence[str], ks: Sequence[int], model_version: str | None,
                       precision: str = "fp32", uncertain: Sequence[bool] | None = None,
                       ood_scores: Sequence[float] | None = None) -> list[dict]:
    """One JSON-ready dict per row of ``probs`` (N x classes), with its own ``k``.

    ``uncertain``: the uncertainty rule's verdict per row (the label is given either way); ``ood_scores``: the
    distance it was judged on (None where the model has no feature statistics).
    """
    if len(ks) != probs.shape[0]:
        raise ValueError(f"{len(ks)} k values for {probs.shape[0]} rows")
    max_k = max(ks) if ks else 1
    top_p, top_i = torch.topk(probs, k=max_k, dim=1)
    top_p, top_i = top_p.tolist(), top_i.tolist()
    flags = list(uncertain) if uncertain is not None else [False] * len(ks)
    scores = list(ood_scores) if ood_scores is not None else [None] * len(ks)
    results = []
    for row_p, row_i, k, flag, score in zip(top_p, top_i, ks, flags, scores, strict=True):
        top = [{"label": labels[i], "index": i, "probability": p} for p, i in zip(row_p[:k], row_i[:k], strict=True)]
        results.append({
            "label": top[0]["label"],
            "index": top[0]["index"],
            "confidence": top[0]["probability"],
            "uncertain": bool(flag),
            "ood_score": None if score is None or score != score else round(float(score), 5),
            "top_k": top,
            "model_version": model_version,
            "precision": precision,
        })
    return results
