"""Knowing when the model is out of its depth: calibrated confidence and the distance to the training images.

A model trained on studio frames of single fruits is confidently wrong on most other photos. Two signals tell
those inputs apart, and the rule flags an answer ``uncertain`` when either says so:

- the *calibrated* top probability (softmax of the logits divided by a temperature fitted on the validation
  split) is below ``min_confidence``: the model hesitates between classes;
- the *nearest-neighbour distance* is above ``max_distance``: the cosine distance of the image's penultimate
  features to those of the nearest training image of the class it is called (Sun et al., "Out-of-distribution
  detection with deep nearest neighbors", ICML 2022, on normalised features). The image looks like no training
  image of that class, however confident its softmax is.

The fit (``fruitserve.train.uncertainty``) stores the temperature and both thresholds in ``metadata.json``
(``uncertainty``) and the training images' normalised features, grouped by class, in ``feature_stats.npz``.
Looking only at the predicted class keeps the cost at one small product per class in the batch (about a hundred
training images each) rather than a product with the whole training set. BENCHMARKS.md, Uncertainty, has the
measurements that chose this score over plain top probability, the energy score and the Mahalanobis distance.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from fruitserve.handler.artifacts import FEATURE_STATS_FILE
from fruitserve.handler.errors import ModelDirError

log = logging.getLogger(__name__)

# metadata.json's uncertainty.score for the statistics this module reads; runs fitted with another score (the
# Mahalanobis distance, until 2026-12) are served with the confidence rule only until `fruit-train calibrate` refits
SCORE = "nearest_neighbour"
THRESHOLDS = ("min_confidence", "max_distance")


@dataclass(frozen=True)
class UncertaintyRule:
    temperature: float = 1.0
    min_confidence: float = 0.0
    max_distance: float | None = None  # None: no feature statistics (an older run); confidence only
    bank: torch.Tensor | None = None  # M x D float32: the training images' L2-normalised features, by class
    offsets: torch.Tensor | None = None  # classes + 1: class c's rows of ``bank`` are offsets[c]:offsets[c + 1]

    @classmethod
    def from_run(cls, metadata: dict, folder: str | os.PathLike, overrides: dict | None = None) -> UncertaintyRule:
        """The rule a run's files describe; ``overrides`` (``min_confidence``, ``max_distance``) replace the
        fitted thresholds, as the handler's ``model-config.yaml`` and ``fruit-batch`` options may."""
        fitted = metadata.get("uncertainty") or {}
        rule = cls(temperature=float(fitted.get("temperature", 1.0)),
                   min_confidence=float(fitted.get("min_confidence", 0.0)))
        stats_path = Path(folder) / FEATURE_STATS_FILE
        if fitted.get("max_distance") is not None and fitted.get("score") != SCORE:
            log.warning("this model's out-of-distribution statistics are of another kind (%s): its answers are "
                        "flagged by confidence only; `fruit-train calibrate RUN` fits them again", fitted.get("score"))
        elif fitted.get("max_distance") is not None and stats_path.is_file():
            with np.load(stats_path, allow_pickle=False) as stats:
                bank, offsets = torch.from_numpy(stats["features"]).float(), torch.from_numpy(stats["offsets"]).long()
            classes = int(metadata.get("num_classes", len(offsets) - 1))
            if (offsets.ndim != 1 or len(offsets) != classes + 1 or int(offsets[-1]) != len(bank)
                    or bool((offsets.diff() < 0).any())):
                raise ModelDirError(f"{stats_path}: its offsets do not describe {len(bank)} feature rows "
                                    f"of {classes} classes")
            rule = replace(rule, max_distance=float(fitted["max_distance"]), bank=bank, offsets=offsets)
        return rule.with_overrides(overrides or {})

    def with_overrides(self, overrides: dict) -> UncertaintyRule:
        changes = {k: float(v) for k, v in overrides.items() if k in THRESHOLDS and v is not None}
        if "max_distance" in changes and self.bank is None:
            raise ValueError("max_distance needs the run's feature statistics (feature_stats.npz, fitted by "
                             "`fruit-train calibrate`), which this model does not have")
        return replace(self, **changes)

    def calibrated(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits.float() / self.temperature, dim=1)

    def distance(self, features: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """Cosine distance (0 to 1: ReLU features are never negative) of each row of ``features`` to the nearest
        training image of its class in ``classes`` (N), or NaN without feature statistics."""
        if self.bank is None or len(features) == 0:
            return torch.full((len(features),), float("nan"))
        return nearest_distance(features, classes, self.bank, self.offsets)

    def assess(self, logits: torch.Tensor, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The whole rule on one batch: calibrated probabilities, the distance to the predicted class, the flags."""
        probabilities = self.calibrated(logits)
        confidence, predicted = probabilities.max(dim=1)
        distances = self.distance(features, predicted)
        return probabilities, distances, self.uncertain(confidence, distances)

    def uncertain(self, confidence: torch.Tensor, distance: torch.Tensor) -> torch.Tensor:
        flagged = confidence < self.min_confidence
        if self.max_distance is not None:
            flagged |= distance > self.max_distance
        return flagged


def normalized(features: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(features.float(), dim=1)


def nearest_distance(features: torch.Tensor, classes: torch.Tensor, bank: torch.Tensor, offsets: torch.Tensor,
                     excluded: torch.Tensor | None = None) -> torch.Tensor:
    """1 - the largest cosine similarity of each row of ``features`` (N x D) with the rows of ``bank`` (normalised,
    grouped by class as ``offsets`` says) of its class in ``classes`` (N). ``excluded`` (N x M bool), if given,
    leaves those bank rows out for that row (the fit's held-out views); a row with none left gets distance 1."""
    queries = normalized(features)
    distances = torch.ones(len(queries))
    for c in classes.unique().tolist():
        rows = (classes == c).nonzero().squeeze(1)
        start, end = int(offsets[c]), int(offsets[c + 1])
        similarity = queries[rows] @ bank[start:end].T
        if excluded is not None:
            similarity = similarity.masked_fill(excluded[rows, start:end], -1.0)
        if end > start:
            distances[rows] = (1 - similarity.max(dim=1).values).clamp(0, 1)
    return distances
