"""Fitting the uncertainty rule after training (``handler/uncertainty.py`` says what the rule is).

- the feature bank: the penultimate features of the training split, L2-normalised and grouped by class, stored in
  ``feature_stats.npz``;
- ``max_distance``: the distance that leaves ``DISTANCE_FLAG_RATE`` of the validation split flagged. A run whose
  validation held whole stretches of each video out of training (``--val-stretch``) is measured as it is: its
  frames are as new to the network as Test's. Otherwise each validation frame is measured *without the training
  frames of its own video within* ``HOLDOUT_FRAMES`` (``holdout_frames``). Fruits-360
  splits are frames of one rotation video per class and prefix: a random validation frame has trained neighbours a
  few frames away, Test's frames lie a median 9 and at p90 26 frames from a trained one (``bench/frame_gaps.py``,
  from file names). Held out like this, validation stands for views as new as Test's; as it is, its threshold
  flagged several per cent of such views (BENCHMARKS.md, Uncertainty). Files not named as frames (another
  dataset) are measured against the whole bank: their validation split is then a sample like any other;
- the temperature: minimises the negative log-likelihood of the validation split seen through the training
  augmentation (``AUGMENTED_PASSES`` passes, seeded). Not of the clean split: on Fruits-360 the model classifies
  the clean validation split perfectly, and there the likelihood only grows as the temperature falls to 0 (every
  answer certain); through the augmentation it errs about as often as on Test, and the fit is well posed;
- ``min_confidence``: the lowest of ``MIN_CONFIDENCE_GRID`` at which the answers the rule gives on that augmented
  validation are at least ``ANSWERED_ACCURACY`` right (its errors are the only in-distribution errors the fit
  has: the clean split has none).

Every threshold is chosen on inputs the project can make: the validation split, which must stay answered, seen as
it is and through the augmentation, and the out-of-distribution sets of ``train/ood.py`` that ``fruit-train``
checks after the fit (BENCHMARKS.md, Uncertainty). Fruits-360 Test's images are never looked at here.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from fruitserve.handler.artifacts import FEATURE_STATS_FILE
from fruitserve.handler.classifier import Classifier
from fruitserve.handler.uncertainty import SCORE, UncertaintyRule, nearest_distance, normalized

from . import data as datasets
from .presets import TrainAugment

# The share of the (held-out) validation split the distance alone may flag: its 99.5th percentile.
DISTANCE_FLAG_RATE = 0.005
# Training frames of a validation frame's own video this close (in frames) are left out of its distance when the
# split took random frames: Test's p90 gap to a trained frame (bench/frame_gaps.py). The benchmark log has the
# thresholds of 0-40 (2026-12-07).
HOLDOUT_FRAMES = 26
MIN_CONFIDENCE_GRID = (0.5, 0.6, 0.7, 0.8, 0.9)
ANSWERED_ACCURACY = 0.998  # what the answered share must reach on augmented validation (issue 18's Test target)
AUGMENTED_PASSES = 8  # 8 x the validation split: ~14,000 images on Fruits-360, so one error is 0.007 %
AUGMENT_CHUNK = 256  # images per augmentation call: fixed, so the augmented set does not depend on the batch size


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


def feature_bank(features: torch.Tensor, targets: torch.Tensor, num_classes: int) -> dict[str, torch.Tensor]:
    """The normalised ``features`` (N x D) in class order, the row offsets of each class, and the order used. Kept
    at float16 precision, as stored (half the file; distances move by ~1e-4 against thresholds near 0.1), so that
    the fit measures what the server will."""
    order = bank_order(targets)
    counts = torch.bincount(targets, minlength=num_classes)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    return {"features": normalized(features[order]).half().float(), "offsets": offsets, "order": order}


def bank_order(targets: torch.Tensor) -> torch.Tensor:
    """The order of the training images in the bank: by class, stable."""
    return torch.argsort(targets, stable=True)


def save_feature_bank(bank: dict[str, torch.Tensor], path: Path) -> None:
    """Plain arrays in an ``.npz``, written atomically: the handler reads them without pickle."""
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, features=bank["features"].half().numpy(), offsets=bank["offsets"].numpy())
    os.replace(tmp, path)


def held_out_views(query_paths: list[Path], query_targets: torch.Tensor, bank_paths: list[Path],
                   bank_targets: torch.Tensor, frames: int = HOLDOUT_FRAMES) -> torch.Tensor:
    """N x M: bank image j is a frame of query image i's own video within ``frames`` frames (so it is left out of
    i's distance). Files not named as frames hold out nothing."""
    # one numbering of videos for both sides, so that equal ids mean the same video; -1: not a frame
    paths, targets = [*query_paths, *bank_paths], torch.cat([query_targets, bank_targets]).tolist()
    all_ids = torch.full((len(paths),), -1, dtype=torch.int32)
    all_frames = torch.zeros(len(paths), dtype=torch.int32)
    for video_id, video in enumerate(datasets.frames_by_video(paths, targets).values()):
        for frame, i in video:
            all_ids[i], all_frames[i] = video_id, frame
    q_video, b_video = all_ids[:len(query_paths)], all_ids[len(query_paths):]
    q_frame, b_frame = all_frames[:len(query_paths)], all_frames[len(query_paths):]
    same_video = (q_video[:, None] == b_video[None, :]) & (q_video[:, None] >= 0)
    return same_video & ((q_frame[:, None] - b_frame[None, :]).abs() <= frames)


def holdout_frames(training: dict) -> int:
    """How near (in frames) a validation frame's own-video training frames are left out of its distance, for a run
    trained with these options (``metadata["training"]``): ``HOLDOUT_FRAMES`` for random frames or a ``--val-dir``;
    none when ``--val-stretch`` held whole stretches out of training, since then the network never saw those
    neighbours, nor does the bank."""
    return 0 if datasets.val_stretch_of(training) > 1 else HOLDOUT_FRAMES


def held_out_distance(features: torch.Tensor, classes: torch.Tensor, val: datasets.DecodedImages,
                      train: datasets.DecodedImages, bank: torch.Tensor, offsets: torch.Tensor,
                      frames: int) -> tuple[torch.Tensor, int]:
    """Validation's distances as ``max_distance`` is fitted on them: each image of ``val`` (its ``features``, the
    ``classes`` it is called) without the frames of its own video within ``frames`` in ``bank``, the bank of
    ``train``; and how many of them had frames held out. 0 frames holds nothing out (validation is not in the
    bank), so the N x M mask is not built then."""
    if frames == 0:
        return nearest_distance(features, classes, bank, offsets), 0
    order = bank_order(train.targets)
    excluded = held_out_views(val.paths, val.targets, [train.paths[i] for i in order], train.targets[order], frames)
    return nearest_distance(features, classes, bank, offsets, excluded), int(excluded.any(dim=1).sum())


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
              passes: int = AUGMENTED_PASSES) -> tuple[torch.Tensor, torch.Tensor]:
    """``images`` through the training augmentation, ``passes`` times, as uint8 images again (so they go through the
    served graph's own normalisation), with their targets."""
    config = classifier.config
    augment = TrainAugment(config.mean, config.std)
    generator = torch.Generator().manual_seed(seed)
    mean = torch.tensor(config.mean).view(1, 3, 1, 1)
    std = torch.tensor(config.std).view(1, 3, 1, 1)
    batches = [((augment(images[i:i + AUGMENT_CHUNK], generator) * std + mean) * 255).round().clamp(0, 255)
               .to(torch.uint8)
               for _ in range(passes) for i in range(0, len(images), AUGMENT_CHUNK)]
    return torch.cat(batches), targets.repeat(passes)


def fit_min_confidence(probabilities: torch.Tensor, distances: torch.Tensor, targets: torch.Tensor,
                       max_distance: float) -> tuple[float, dict]:
    """The lowest confidence threshold of ``MIN_CONFIDENCE_GRID`` at which what the rule answers is at least
    ``ANSWERED_ACCURACY`` right (the grid's highest if none is), and what each threshold answers, how accurately."""
    confidence, predicted = probabilities.max(dim=1)
    correct = predicted == targets
    table = {str(threshold): answered_summary(correct, (confidence < threshold) | (distances > max_distance))
             for threshold in MIN_CONFIDENCE_GRID}
    chosen = next((t for t in MIN_CONFIDENCE_GRID if table[str(t)]["accuracy_answered"] >= ANSWERED_ACCURACY),
                  MIN_CONFIDENCE_GRID[-1])
    return chosen, table


def share(mask: torch.Tensor) -> float:
    return round(float(mask.double().mean()), 5) if len(mask) else math.nan


def answered_summary(correct: torch.Tensor, uncertain: torch.Tensor) -> dict:
    """What a rule does to a labelled set (``correct``, ``uncertain``: N bools): the share it answers, how much of
    that is right, and the share of the errors it flags (NaN where there is nothing to count)."""
    answered = ~uncertain
    return {"answered": share(answered), "accuracy_answered": share(correct[answered]),
            "errors_flagged": share(uncertain[~correct])}


def fit_rule(classifier: Classifier, train: datasets.DecodedImages, val: datasets.DecodedImages, run_dir: Path,
             seed: int = 0, frames: int = HOLDOUT_FRAMES) -> tuple[UncertaintyRule, dict, dict[str, torch.Tensor]]:
    """Fit the rule on ``classifier`` (the exported model, fp32) and write ``feature_stats.npz``; the rule, the
    ``uncertainty`` section of ``metadata.json`` (thresholds, and what they do on validation), and validation's
    distances, as it is and with the neighbours within ``frames`` held out (what ``max_distance`` is the
    percentile of; ``holdout_frames`` says how many for a run)."""
    bank = feature_bank(classifier.logits_and_features(train.images)[1], train.targets, len(classifier.labels))
    save_feature_bank(bank, run_dir / FEATURE_STATS_FILE)
    val_logits, val_features = classifier.logits_and_features(val.images)
    predicted = val_logits.argmax(dim=1)
    held_out, held_out_views_count = held_out_distance(val_features, predicted, val, train, bank["features"],
                                                       bank["offsets"], frames)
    max_distance = float(torch.quantile(held_out.double(), 1 - DISTANCE_FLAG_RATE))
    measure = UncertaintyRule(max_distance=max_distance, bank=bank["features"], offsets=bank["offsets"])

    augmented_images, augmented_targets = augmented(val.images, val.targets, classifier, seed)
    augmented_logits, augmented_features = classifier.logits_and_features(augmented_images)
    temperature = fit_temperature(augmented_logits, augmented_targets)
    augmented_probabilities = torch.softmax(augmented_logits / temperature, dim=1)
    augmented_distances = measure.distance(augmented_features, augmented_logits.argmax(dim=1))
    min_confidence, by_confidence = fit_min_confidence(augmented_probabilities, augmented_distances,
                                                       augmented_targets, max_distance)
    rule = UncertaintyRule(temperature, min_confidence, max_distance, bank["features"], bank["offsets"])

    def answered_on(probabilities: torch.Tensor, distances: torch.Tensor, targets: torch.Tensor) -> dict:
        correct = probabilities.argmax(dim=1) == targets
        return {"images": len(targets), "accuracy": share(correct)} | answered_summary(
            correct, rule.uncertain(probabilities.max(dim=1).values, distances))

    val_probabilities = rule.calibrated(val_logits)
    val_distances = measure.distance(val_features, predicted)
    return rule, {
        "score": SCORE, "temperature": round(temperature, 5), "min_confidence": min_confidence,
        "max_distance": round(max_distance, 5),
        "fitted_on": {"feature_bank": f"training ({len(train.targets)} images)",
                      "max_distance": f"validation, {1 - DISTANCE_FLAG_RATE:.1%} percentile, "
                                      + (f"without the training frames of its own video within {frames} frames"
                                         if frames else "as it is (split by --val-stretch: no frames held out again)"),
                      "temperature": f"validation through the training augmentation, {AUGMENTED_PASSES} passes",
                      "min_confidence": f"the same augmented validation: the lowest of {list(MIN_CONFIDENCE_GRID)} "
                                        f"whose answers are at least {ANSWERED_ACCURACY:.1%} right"},
        "validation": answered_on(val_probabilities, val_distances, val.targets)
        | {"held_out_views": held_out_views_count,
           "answered_held_out": share(~rule.uncertain(val_probabilities.max(dim=1).values, held_out))},
        "augmented": answered_on(augmented_probabilities, augmented_distances, augmented_targets)
        | {"by_min_confidence": by_confidence,
           "ece_before": round(expected_calibration_error(torch.softmax(augmented_logits, 1), augmented_targets), 5),
           "ece_after": round(expected_calibration_error(augmented_probabilities, augmented_targets), 5)},
    }, {"validation": val_distances, "validation, neighbours held out": held_out}
