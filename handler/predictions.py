"""Softmax scores to the JSON every client sees; shared by the handler and ``fruit-batch --local``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

try:
    from .preprocessing import InputError
except ImportError:  # inside fruit.mar
    from preprocessing import InputError

DEFAULT_TOP_K = 5


@dataclass
class Decoded:
    """One request after preprocessing: a uint8 tensor to score, or the error to answer with."""

    tensor: torch.Tensor | None
    top_k: int
    error: InputError | None = None


@dataclass
class Parsed:
    """One TorchServe request after parsing: its images, and the protocol its answer must speak.

    ``protocol`` is None for a plain TorchServe request (one image, one JSON object back).
    ``error`` is set when the request itself is malformed (not an image: e.g. a KServe body
    without a list of instances); its images are then never scored.
    """

    items: list[Decoded]
    protocol: str | None = None
    request_id: str | None = None
    outputs: list[tuple[str, int]] = field(default_factory=list)  # KServe v2: (input name, images in it)
    error: InputError | None = None


def clamp_top_k(requested: int | None, num_classes: int, default: int = DEFAULT_TOP_K) -> int:
    """``min(requested, classes)``, at least 1: asking for more classes than exist is not an error."""
    k = default if requested is None else int(requested)
    return max(1, min(k, num_classes))


def probabilities(logits: torch.Tensor) -> torch.Tensor:
    # float32 softmax so that AMP logits give the same probabilities as CPU ones
    return torch.softmax(logits.float(), dim=1)


def format_predictions(
    probs: torch.Tensor, labels: Sequence[str], ks: Sequence[int], model_version: str | None
) -> list[dict]:
    """One JSON-ready dict per row of ``probs`` (N x classes), with its own ``k``."""
    if len(ks) != probs.shape[0]:
        raise ValueError(f"{len(ks)} k values for {probs.shape[0]} rows")
    max_k = max(ks) if ks else 1
    top_p, top_i = torch.topk(probs, k=max_k, dim=1)
    top_p, top_i = top_p.tolist(), top_i.tolist()
    results = []
    for row_p, row_i, k in zip(top_p, top_i, ks, strict=True):
        top = [{"label": labels[i], "index": i, "probability": p} for p, i in zip(row_p[:k], row_i[:k], strict=True)]
        results.append(
            {
                "label": top[0]["label"],
                "index": top[0]["index"],
                "confidence": top[0]["probability"],
                "top_k": top,
                "model_version": model_version,
            }
        )
    return results
