"""Fitting the uncertainty rule after training (``handler/uncertainty.py`` says what the rule is).

- the temperature: minimises the negative log-likelihood of the validation split seen through the training
  augmentation (``AUGMENTED_PASSES`` passes, seeded). Not of the clean split: on Fruits-360 the model classifies
  the clean validation split perfectly, and there the likelihood only grows as the temperature falls to 0 (every
  answer certain); through the augmentation it errs about as often as on Test, and the fit is well posed;
- the feature statistics: one mean per class and one shared covariance of the penultimate features of the
  training split (shrunk towards a scaled identity so it can be inverted: ReLU features leave dimensions
  empty), stored in ``feature_stats.npz``;
- ``max_distance``: the distance that leaves ``DISTANCE_FLAG_RATE`` of the validation split flagged when it is
  seen through the *geometric* part of the training augmentation (rotation, zoom, shift, flip): other frames of the
  same fruits, which is what Fruits-360's Test split is. The clean split alone is too close to the training
  frames: its own percentile flagged 8 % of such frames (BENCHMARKS.md, Uncertainty);
- ``min_confidence``: fixed (``MIN_CONFIDENCE``), on the calibrated probability.

Both thresholds are chosen on inputs the project can make: the validation split, which must stay answered,
and the out-of-distribution sets of ``train/ood.py`` (BENCHMARKS.md, Uncertainty). Fruits-360 Test is never
looked at here.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from fruitserve.handler.artifacts import FEATURE_STATS_FILE
from fruitserve.handler.classifier import Classifier
from fruitserve.handler.uncertainty import UncertaintyRule

from .presets import TrainAugment

# The share of the validation split the distance alone may flag: its 99.5th percentile. (BENCHMARKS.md,
# Uncertainty: what each rate costs on validation and buys on the out-of-distribution sets.)
DISTANCE_FLAG_RATE = 0.005
MIN_CONFIDENCE = 0.5
AUGMENTED_PASSES = 2
SHRINKAGE = 0.01  # of the mean variance, added to the diagonal of the covariance


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """The temperature that minimises the NLL of ``logits`` (fitted on its logarithm, so it stays positive)."""
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    logits, targets = logits.double(), targets.long()
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits / log_t.exp(), targets)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return float(log_t.detach().exp())


def fit_feature_stats(features: torch.Tensor, targets: torch.Tensor, num_classes: int) -> dict[str, torch.Tensor]:
    """Class means and the inverse of the shared, shrunk covariance of ``features`` (N x D)."""
    features, targets = features.double(), targets.long()
    means = torch.zeros(num_classes, features.shape[1], dtype=torch.float64)
    means.index_add_(0, targets, features)
    counts = torch.bincount(targets, minlength=num_classes).clamp(min=1).double()
    means /= counts[:, None]
    centred = features - means[targets]
    covariance = centred.T @ centred / len(features)
    covariance += SHRINKAGE * covariance.diagonal().mean() * torch.eye(covariance.shape[0], dtype=torch.float64)
    return {"class_means": means.float(), "precision": torch.linalg.inv(covariance).float()}


def save_feature_stats(stats: dict[str, torch.Tensor], path: Path) -> None:
    """Plain float32 arrays in an ``.npz``, written atomically: the handler reads them without pickle."""
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **{k: v.float().numpy() for k, v in stats.items()})
    os.replace(tmp, path)


def expected_calibration_error(probabilities: torch.Tensor, targets: torch.Tensor, bins: int = 15) -> float:
    confidence, predicted = probabilities.max(dim=1)
    correct = (predicted == targets).double()
    edges = torch.linspace(0, 1, bins + 1)
    error = 0.0
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        inside = (confidence > lo) & (confidence <= hi)
        if inside.any():
            error += float(inside.double().mean()) * abs(float(correct[inside].mean() - confidence[inside].mean()))
    return error


def augmented(images: torch.Tensor, targets: torch.Tensor, classifier: Classifier, seed: int,
              geometric_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``images`` through the training augmentation (or only its rotation, zoom, shift and flip), ``AUGMENTED_PASSES``
    times, as uint8 images again (so they go through the served graph's own normalisation), with their targets."""
    config = classifier.config
    augment = TrainAugment(config.mean, config.std)
    if geometric_only:
        augment = TrainAugment(config.mean, config.std, small_p=0, background_p=0, color_p=0, light_p=0, blur_p=0,
                               noise_p=0)
    generator = torch.Generator().manual_seed(seed)
    mean = torch.tensor(config.mean).view(1, 3, 1, 1)
    std = torch.tensor(config.std).view(1, 3, 1, 1)
    batches = [((augment(images[i:i + classifier.max_batch], generator) * std + mean) * 255).round().clamp(0, 255)
               .to(torch.uint8)
               for _ in range(AUGMENTED_PASSES) for i in range(0, len(images), classifier.max_batch)]
    return torch.cat(batches), targets.repeat(AUGMENTED_PASSES)


def fit_rule(classifier: Classifier, train_images: torch.Tensor, train_targets: torch.Tensor,
             val_images: torch.Tensor, val_targets: torch.Tensor, run_dir: Path,
             seed: int = 0) -> tuple[UncertaintyRule, dict]:
    """Fit the rule on ``classifier`` (the exported model, fp32) and write ``feature_stats.npz``; the rule, and the
    ``uncertainty`` section of ``metadata.json`` (thresholds, and what they do on validation)."""
    train_features = classifier.logits_and_features(train_images)[1]
    stats = fit_feature_stats(train_features, train_targets, len(classifier.labels))
    save_feature_stats(stats, run_dir / FEATURE_STATS_FILE)
    val_logits, val_features = classifier.logits_and_features(val_images)
    augmented_images, augmented_targets = augmented(val_images, val_targets, classifier, seed)
    augmented_logits = classifier.logits(augmented_images)
    temperature = fit_temperature(augmented_logits, augmented_targets)
    measure = UncertaintyRule(class_means=stats["class_means"], precision_matrix=stats["precision"])
    other_frames, _ = augmented(val_images, val_targets, classifier, seed, geometric_only=True)
    frame_distances = measure.distance(classifier.logits_and_features(other_frames)[1])
    max_distance = float(torch.quantile(frame_distances.double(), 1 - DISTANCE_FLAG_RATE))
    distances = measure.distance(val_features)
    rule = UncertaintyRule(temperature, MIN_CONFIDENCE, max_distance, stats["class_means"], stats["precision"])
    calibrated = rule.calibrated(val_logits)
    flagged = rule.uncertain(calibrated.max(dim=1).values, distances)
    correct = calibrated.argmax(dim=1) == val_targets
    answered = ~flagged
    return rule, {"temperature": round(temperature, 5), "min_confidence": MIN_CONFIDENCE,
            "score": "mahalanobis", "max_distance": round(max_distance, 3),
            "fitted_on": {"temperature": f"validation through the training augmentation, {AUGMENTED_PASSES} passes",
                          "feature_stats": "training",
                          "max_distance": f"validation through rotation, zoom, shift and flip, "
                                          f"{1 - DISTANCE_FLAG_RATE:.1%} percentile"},
            "validation": {"images": len(val_targets), "answered": round(float(answered.double().mean()), 5),
                           "accuracy_answered": round(float(correct[answered].double().mean()), 5)
                           if answered.any() else math.nan,
                           "augmented_accuracy": round(float((augmented_logits.argmax(1) == augmented_targets)
                                                             .double().mean()), 5),
                           "augmented_ece_before": round(expected_calibration_error(
                               torch.softmax(augmented_logits, 1), augmented_targets), 5),
                           "augmented_ece_after": round(expected_calibration_error(
                               rule.calibrated(augmented_logits), augmented_targets), 5)}}


