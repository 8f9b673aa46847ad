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
                       precision: str = "fp32") -> list[dict]:
    """One JSON-ready dict per row of ``probs`` (N x classes), with its own ``k``."""
    if len(ks) != probs.shape[0]:
        raise ValueError(f"{len(ks)} k values for {probs.shape[0]} rows")
    max_k = max(ks) if ks else 1
    top_p, top_i = torch.topk(probs, k=max_k, dim=1)
    top_p, top_i = top_p.tolist(), top_i.tolist()
    results = []
    for row_p, row_i, k in zip(top_p, top_i, ks, strict=True):
        top = [{"label": labels[i], "index": i, "probability": p} for p, i in zip(row_p[:k], row_i[:k], strict=True)]
        results.append({
            "label": top[0]["label"],
            "index": top[0]["index"],
            "confidence": top[0]["probability"],
            "top_k": top,
            "model_version": model_version,
            "precision": precision,
        })
    return results
