"""Knowing when the model is out of its depth: calibrated confidence and a distance in feature space.

A model trained on studio frames of single fruits is confidently wrong on most other photos. Two signals tell
those inputs apart, and the rule flags an answer ``uncertain`` when either says so:

- the *calibrated* top probability (softmax of the logits divided by a temperature fitted on the validation
  split) is below ``min_confidence``: the model hesitates between classes;
- the *Mahalanobis distance* of the penultimate features to the nearest class mean (class means and one shared
  covariance, fitted on the training split) is above ``max_distance``: the input looks like nothing the
  model was trained on, however confident its softmax is.

The fit (``fruitserve.train.uncertainty``) stores the temperature and both thresholds in ``metadata.json``
(``uncertainty``) and the means and inverse covariance in ``feature_stats.npz``; BENCHMARKS.md, Uncertainty, has the
measurements that chose this rule over plain top probability and the energy score.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from fruitserve.handler.artifacts import FEATURE_STATS_FILE


@dataclass(frozen=True)
class UncertaintyRule:
    temperature: float = 1.0
    min_confidence: float = 0.0
    max_distance: float | None = None  # None: no feature statistics (an older run); confidence only
    # float32: float64 costed 4 % of a bf16 forward pass per batch (BENCHMARKS.md, Serving), for no change in the
    # flags (distances in the thousands, thresholds far from float32's 7 digits)
    class_means: torch.Tensor | None = None  # classes x D
    precision_matrix: torch.Tensor | None = None  # D x D: the inverse of the shared covariance
    # each mean's own term of the distance, m P m^T (C): computed once here, as it does not depend on the input and
    # costs more than the batch's own part (C x D x D multiply-adds against N x D x D)
    mean_terms: torch.Tensor | None = field(init=False, default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.class_means is not None:
            object.__setattr__(self, "mean_terms", mean_terms(self.class_means.float(), self.precision_matrix.float()))

    @classmethod
    def from_run(cls, metadata: dict, folder: str | os.PathLike, overrides: dict | None = None) -> UncertaintyRule:
        """The rule a run's files describe; ``overrides`` (``min_confidence``, ``max_distance``) replace the
        fitted thresholds, as the handler's ``model-config.yaml`` and ``fruit-batch`` options may."""
        fitted = metadata.get("uncertainty") or {}
        rule = cls(temperature=float(fitted.get("temperature", 1.0)),
                   min_confidence=float(fitted.get("min_confidence", 0.0)))
        stats_path = Path(folder) / FEATURE_STATS_FILE
        if fitted.get("max_distance") is not None and stats_path.is_file():
            with np.load(stats_path, allow_pickle=False) as stats:
                means, precision = (torch.from_numpy(stats[k]).float() for k in ("class_means", "precision"))
            rule = replace(rule, max_distance=float(fitted["max_distance"]), class_means=means,
                           precision_matrix=precision)
        return rule.with_overrides(overrides or {})

    def with_overrides(self, overrides: dict) -> UncertaintyRule:
        changes = {k: float(v) for k, v in overrides.items() if k in ("min_confidence", "max_distance") and v is not None}
        if "max_distance" in changes and self.class_means is None:
            raise ValueError("max_distance needs the run's feature statistics (feature_stats.npz), which this model "
                             "does not have")
        return replace(self, **changes)

    def calibrated(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits.float() / self.temperature, dim=1)

    def distance(self, features: torch.Tensor) -> torch.Tensor:
        """Squared Mahalanobis distance to the nearest class mean (N), or NaN without feature statistics."""
        if self.class_means is None or len(features) == 0:
            return torch.full((len(features),), float("nan"))
        return mahalanobis(features.float(), self.class_means, self.precision_matrix, self.mean_terms).min(dim=1).values

    def uncertain(self, confidence: torch.Tensor, distance: torch.Tensor) -> torch.Tensor:
        flagged = confidence < self.min_confidence
        if self.max_distance is not None:
            flagged |= distance > self.max_distance
        return flagged


def mean_terms(means: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """m P m^T for every mean (C): the part of the distance that does not depend on the input."""
    return ((means @ precision) * means).sum(dim=1)


def mahalanobis(features: torch.Tensor, means: torch.Tensor, precision: torch.Tensor,
                means_term: torch.Tensor | None = None) -> torch.Tensor:
    """Squared Mahalanobis distance of every row of ``features`` (N x D) to every mean (C x D): N x C, expanded as
    f P f^T - 2 f P m^T + m P m^T (P symmetric). ``means_term`` is ``mean_terms(means, precision)``, if known."""
    projected = features @ precision  # N x D
    if means_term is None:
        means_term = mean_terms(means, precision)
    return (projected * features).sum(dim=1, keepdim=True) - 2 * projected @ means.T + means_term
