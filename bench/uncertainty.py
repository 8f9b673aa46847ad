"""Which out-of-distribution score to ship, and what the shipped rule does: measured on inputs made or found here.

    .venv/bin/python -m bench.uncertainty --run runs/<run> [--report-test]

Sets (never Fruits-360 Test for choosing): the run's validation split (in distribution: must stay answered), as it
is and, for a run of random frames, with each frame's neighbours held out of the feature bank as the fit does
(``train/uncertainty.holdout_frames``; a run split by ``--val-stretch`` has them out of training already); each
shift of ``train/ood.py`` applied to validation images (background, small and off-centre, light, blur and JPEG,
all together); composites of several fruits; textures with no fruit; and real photos that are not fruit, from the
sample images scikit-image and matplotlib ship (crops at several scales). Scores compared: the calibrated top
probability, the energy score, the Mahalanobis distance to the nearest class mean (class means and a shared
covariance of the training features, fitted here), the shipped nearest-neighbour distance and the class ratio
(trust score), each at thresholds that leave 0.5 %, 1 % and 2 % of validation flagged; then the shipped rule
(confidence or distance, thresholds from the run's metadata) and the candidate with the ratio in its place
(``ratio_rule``: not shipped, docs/benchmark-log.md, 2026-12-07 evening). ``--report-test`` adds Fruits-360
Test, once the choice is made: answered share and accuracy among the answered, for both rules and for plain top
probability. Also timed: the distance beside the forward pass of a batch of 32.
Writes ``bench/results/uncertainty.json`` (``--name``: another name, to keep a second run's figures beside it).
"""

from __future__ import annotations

import argparse
import io
import random
from dataclasses import replace
from pathlib import Path

import torch
from fruitserve.handler.classifier import Classifier, load_classifier
from fruitserve.handler.preprocessing import decode_image, resize_and_crop, to_uint8_tensor
from fruitserve.handler.uncertainty import UncertaintyRule, normalized
from fruitserve.train import data as datasets
from fruitserve.train.ood import CONDITIONS, composite, texture
from fruitserve.train.uncertainty import (
    DISTANCE_FLAG_RATE,
    answered_summary,
    augmented,
    held_out_distance,
    holdout_frames,
)
from PIL import Image

from bench.frame_gaps import gap_of_each, trained_frames
from bench.report import DEFAULT_IMAGES, median_ms, save_results

VALIDATION_FLAG_RATES = (0.005, 0.01, 0.02)


def sample_photos(count: int, seed: int) -> list[Image.Image]:
    """Real photos that are not fruit: the sample images two installed packages ship, cropped at random."""
    sources = []
    try:
        from skimage import data as skdata

        for name in ("astronaut", "coffee", "chelsea", "rocket", "motorcycle_left", "hubble_deep_field",
                     "immunohistochemistry", "colorwheel", "retina", "cat", "logo"):
            try:
                array = getattr(skdata, name)()
            except Exception:  # noqa: BLE001 - some sample images are downloaded on demand: skipped here
                continue
            image = Image.fromarray(array[..., :3] if array.ndim == 3 else array).convert("RGB")
            sources.append(image)
    except ImportError:
        pass
    import matplotlib.cbook

    for name in ("grace_hopper.jpg",):
        try:
            with matplotlib.cbook.get_sample_data(name) as handle:
                sources.append(Image.open(io.BytesIO(handle.read())).convert("RGB"))
        except (OSError, ValueError):
            pass
    if not sources:
        return []
    rng = random.Random(seed)
    crops = []
    for _ in range(count):
        image = rng.choice(sources)
        side = int(min(image.size) * rng.uniform(0.3, 1.0))
        x, y = rng.randint(0, image.width - side), rng.randint(0, image.height - side)
        crops.append(image.crop((x, y, x + side, y + side)).resize((100, 100), Image.BILINEAR))
    return crops


def to_batch(images: list[Image.Image], size: int) -> torch.Tensor:
    return torch.stack([to_uint8_tensor(resize_and_crop(im, size)) for im in images])


class Mahalanobis:
    """The squared Mahalanobis distance to the nearest class mean (Lee et al., 2018): class means and one shared
    covariance of the training features, shrunk towards a scaled identity so it can be inverted (ReLU features
    leave dimensions empty). The score the rule used until 2026-12; kept here to compare against."""

    SHRINKAGE = 0.01  # of the mean variance, added to the diagonal

    def __init__(self, features: torch.Tensor, targets: torch.Tensor, num_classes: int) -> None:
        features = features.double()
        means = torch.zeros(num_classes, features.shape[1], dtype=torch.float64).index_add_(0, targets, features)
        means /= torch.bincount(targets, minlength=num_classes).clamp(min=1).double()[:, None]
        centred = features - means[targets]
        covariance = centred.T @ centred / len(features)
        covariance += self.SHRINKAGE * covariance.diagonal().mean() * torch.eye(len(covariance), dtype=torch.float64)
        self.means, self.precision = means, torch.linalg.inv(covariance)

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        projected = features.double() @ self.precision
        mean_terms = ((self.means @ self.precision) * self.means).sum(dim=1)
        return ((projected * features.double()).sum(dim=1, keepdim=True) - 2 * projected @ self.means.T
                + mean_terms).min(dim=1).values.float()


def scores_of(classifier: Classifier, images: torch.Tensor, mahalanobis: Mahalanobis,
              distances: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Every score, oriented so that higher means "more out of distribution". ``distances`` replaces the
    nearest-neighbour distances (the held-out validation)."""
    logits, features = classifier.logits_and_features(images)
    rule = classifier.uncertainty
    calibrated = rule.calibrated(logits)
    confidence, predicted = calibrated.max(dim=1)
    if distances is None:
        distances = rule.distance(features, predicted)
    return {"top_probability": -confidence,
            "energy": -rule.temperature * torch.logsumexp(logits / rule.temperature, dim=1),
            "mahalanobis": mahalanobis(features),
            "nearest_neighbour": distances,
            "class_ratio": class_ratio(rule, features, predicted, distances),
            "shipped_rule": rule.uncertain(confidence, distances).float()}


def nearest_other_distance(features: torch.Tensor, classes: torch.Tensor, bank: torch.Tensor,
                           offsets: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """1 - the largest cosine similarity of each row of ``features`` with the bank rows of every class *but* its
    own in ``classes``: the other half of the trust score (Jiang et al., "To trust or not to trust a classifier",
    NeurIPS 2018), whose ratio to ``nearest_distance`` says whether an image is nearer its own class than any
    other, however far both are."""
    queries = normalized(features)
    column_class = torch.repeat_interleave(torch.arange(len(offsets) - 1), offsets.diff())
    distances = torch.ones(len(queries))
    for start in range(0, len(queries), chunk):
        rows = slice(start, start + chunk)
        similarity = (queries[rows] @ bank.T).masked_fill(column_class[None, :] == classes[rows, None], -1.0)
        distances[rows] = (1 - similarity.max(dim=1).values).clamp(0, 1)
    return distances


def class_ratio(rule: UncertaintyRule, features: torch.Tensor, predicted: torch.Tensor,
                distances: torch.Tensor) -> torch.Tensor:
    """The trust score's inverse (Jiang et al., 2018): the distance to the nearest training image of the predicted
    class over the distance to the nearest of any other class. Near 0: clearly of its class, however far; near or
    above 1: as near another class, or nearer."""
    return distances / nearest_other_distance(features, predicted, rule.bank, rule.offsets).clamp(min=1e-6)


def held_out_distances(classifier: Classifier, validation: datasets.DecodedImages,
                       training: datasets.DecodedImages, frames: int) -> torch.Tensor:
    """Validation's nearest-neighbour distances as the fit measures them: each frame without the training frames
    of its own video within ``frames`` (``train/uncertainty.held_out_distance``)."""
    rule = classifier.uncertainty
    logits, features = classifier.logits_and_features(validation.images)
    return held_out_distance(features, logits.argmax(dim=1), validation, training, rule.bank, rule.offsets, frames)[0]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--per-set", type=int, default=600, help="images in each out-of-distribution set")
    parser.add_argument("--precision", default="auto", help="as served")
    parser.add_argument("--report-test", action="store_true", help="also report on Fruits-360 Test")
    parser.add_argument("--test-images", type=Path, default=DEFAULT_IMAGES)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="uncertainty", help="bench/results/NAME.json")
    args = parser.parse_args()

    classifier = load_classifier(args.run, device="cpu", precision=args.precision)
    if classifier.uncertainty.bank is None:
        raise SystemExit(f"{args.run} has no nearest-neighbour statistics: fruit-train calibrate {args.run}")
    size = classifier.config.input_size
    train_files, files = datasets.splits_of_run(classifier.metadata, classifier.labels)
    validation, training = (datasets.decode_images([p for p, _ in f], [t for _, t in f], classifier.config,
                                                   progress=False) for f in (files, train_files))
    mahalanobis = Mahalanobis(classifier.logits_and_features(training.images)[1], training.targets,
                              len(classifier.labels))
    rng = random.Random(args.seed)
    picks = [decode_image(p.read_bytes()) for p in rng.sample(validation.paths, min(args.per_set, len(files)))]
    sets: dict[str, torch.Tensor] = {"validation": validation.images}
    for name, shift in CONDITIONS.items():
        if shift is not None:
            shift_rng = random.Random(args.seed + 1)
            sets[f"shift: {name}"] = to_batch([shift(im, shift_rng) for im in picks], size)
    sets["composites"] = to_batch([composite(picks, rng) for _ in picks], size)
    sets["textures"] = to_batch([texture((100, 100), rng) for _ in picks], size)
    photos = sample_photos(len(picks), args.seed)
    if photos:
        sets["real non-fruit photos"] = to_batch(photos, size)

    scored = {name: scores_of(classifier, images, mahalanobis) for name, images in sets.items()}
    frames = holdout_frames(classifier.metadata["training"])
    if frames:  # a run split by --val-stretch has none: its validation is that already
        scored = {"validation, neighbours held out": scores_of(classifier, validation.images, mahalanobis,
                                                               held_out_distances(classifier, validation, training,
                                                                                  frames)),
                  **scored}
    augmented = augmented_validation(classifier, validation.images, validation.targets, args.seed)
    results: dict = {"run": str(args.run), "precision": classifier.precision,
                     "rule": {k: v for k, v in classifier.metadata.get("uncertainty", {}).items()
                              if k in ("temperature", "min_confidence", "max_distance", "score")},
                     "sets": {name: len(s["shipped_rule"]) for name, s in scored.items()}, "methods": {}}
    for method in ("top_probability", "energy", "mahalanobis", "nearest_neighbour", "class_ratio"):
        results["methods"][method] = {}
        for rate in VALIDATION_FLAG_RATES:
            threshold = float(torch.quantile(scored["validation"][method].double(), 1 - rate))
            results["methods"][method][f"validation flagged {rate:.1%}"] = {
                name: round(float((s[method] > threshold).double().mean()), 4) for name, s in scored.items()}
    results["shipped_rule_flagged"] = {name: round(float(s["shipped_rule"].mean()), 4) for name, s in scored.items()}
    # the candidate: the shipped rule with the class ratio in place of the distance, its threshold fitted as the
    # distance's is (the validation the fit uses, DISTANCE_FLAG_RATE of it flagged)
    fit_set = "validation, neighbours held out" if frames else "validation"
    max_ratio = float(torch.quantile(scored[fit_set]["class_ratio"].double(), 1 - DISTANCE_FLAG_RATE))
    # the shipped rule's own test (confidence below, or score above its threshold), with the ratio as the score
    ratio_rule = replace(classifier.uncertainty, max_distance=max_ratio)
    results["ratio_rule"] = {"max_ratio": round(max_ratio, 5), "fitted_on": fit_set, "flagged": {
        name: round(float(ratio_rule.uncertain(-s["top_probability"], s["class_ratio"]).double().mean()), 4)
        for name, s in scored.items()}}
    print("ratio rule:", results["ratio_rule"])
    results["validation_flagged_by_distance_where"] = flagged_by_distance_where(
        validation.paths, validation.targets,
        scored["validation"]["nearest_neighbour"] > classifier.uncertainty.max_distance, train_files, classifier.labels)
    results["augmented_validation"] = augmented
    print("augmented validation:", augmented)
    for method, rows in results["methods"].items():
        for rate, row in rows.items():
            print(f"{method:16s} {rate}: " + ", ".join(f"{k} {v:.1%}" for k, v in row.items()), flush=True)
    print("shipped rule: " + ", ".join(f"{k} {v:.1%}" for k, v in results["shipped_rule_flagged"].items()))
    results["raw_top_probability_flagged"] = raw_top_probability(classifier, sets)
    results["distance_cost"] = distance_cost(classifier, validation.images)
    print("distance cost:", results["distance_cost"])
    if args.report_test:
        results["test"] = report_test(classifier, args.test_images, train_files, ratio_rule)
        print("Test:", results["test"])
    save_results(args.name, results)
    return 0


def distance_cost(classifier: Classifier, images: torch.Tensor, repeats: int = 21) -> dict:
    """What the distance adds to a batch of 32 as served: the median time of the forward pass (logits and
    features) and of the nearest-neighbour distance on its features, measured side by side, and the bank's size."""
    batch = images[:32]
    rule = classifier.uncertainty
    logits, features = classifier.logits_and_features(batch)
    predicted = logits.argmax(dim=1)
    return {"batch": len(batch), "bank_rows": len(rule.bank), "bank_mb_float16": round(rule.bank.numel() * 2 / 1e6, 1),
            "forward_ms": round(median_ms(lambda _: classifier.logits_and_features(batch), range(repeats)), 3),
            "distance_ms": round(median_ms(lambda _: rule.distance(features, predicted), range(repeats)), 3)}


def augmented_validation(classifier: Classifier, images: torch.Tensor, targets: torch.Tensor, seed: int) -> dict:
    """In distribution, but about as hard as Test: validation through the training augmentation (the set the
    temperature is fitted on). How accurate the answers are when the shipped rule answers, and when plain top
    probability answers the same share."""
    images, targets = augmented(images, targets, classifier, seed)
    logits, features = classifier.logits_and_features(images)
    probabilities, _, uncertain = classifier.uncertainty.assess(logits, features)
    correct = probabilities.argmax(dim=1) == targets
    raw = torch.softmax(logits, dim=1).max(dim=1).values
    same_share = raw >= torch.quantile(raw, 1 - float((~uncertain).double().mean()))
    return {"images": len(targets), "accuracy": round(float(correct.double().mean()), 5),
            "shipped_rule": answered_summary(correct, uncertain),
            "plain_top_probability_same_share": answered_summary(correct, ~same_share)}


def raw_top_probability(classifier: Classifier, sets: dict[str, torch.Tensor]) -> dict:
    """The share each set has below an uncalibrated top probability of 0.5 and 0.7: what issue 18 measured the
    held-out shop photos at (75.6 % and 91.0 % flagged), to see which of these sets are as easy or hard."""
    out = {}
    for name, images in sets.items():
        top = torch.softmax(classifier.logits(images), dim=1).max(dim=1).values
        out[name] = {"below_0.5": round(float((top < 0.5).double().mean()), 4),
                     "below_0.7": round(float((top < 0.7).double().mean()), 4)}
    return out


GAP_BINS = ((0, 4), (5, 8), (9, 16), (17, 24), (25, 40), (41, None))  # frames to the nearest trained frame


def flagged_by_distance_where(paths: list[Path], targets: torch.Tensor, far: torch.Tensor,
                              train_files: list[tuple[Path, int]], labels: list[str]) -> dict:
    """Where the distance flags a set: by frame gap to a trained frame of the same video, and by class (the ten
    classes holding most of the flags). Read after the fit, to say what a threshold misses, never to set one."""
    trained = trained_frames([p for p, _ in train_files], [t for _, t in train_files])
    gap = gap_of_each(paths, targets.tolist(), trained)
    by_gap = {}
    for lo, hi in GAP_BINS:
        inside = torch.tensor([g is not None and lo <= g and (hi is None or g <= hi) for g in gap])
        if inside.any():
            by_gap[f"{lo}-{hi if hi is not None else ''}"] = {"images": int(inside.sum()),
                                                             "flagged": round(float(far[inside].double().mean()), 4)}
    per_class = torch.bincount(targets[far], minlength=len(labels))
    sizes = torch.bincount(targets, minlength=len(labels))
    top = torch.argsort(per_class, descending=True, stable=True)[:10].tolist()
    return {"by_frame_gap": by_gap, "classes_with_flags": int((per_class > 0).sum()),
            "top_10_classes_share_of_flags": round(float(per_class[top].sum() / max(1, int(far.sum()))), 4),
            "top_10_classes": {labels[k]: f"{int(per_class[k])}/{int(sizes[k])}" for k in top if per_class[k] > 0}}


def report_test(classifier: Classifier, folder: Path, train_files: list[tuple[Path, int]],
                ratio_rule: UncertaintyRule) -> dict:
    """Fruits-360 Test, reported after the choice: answered share and accuracy among the answered, and where the
    distance flags it."""
    index = datasets.index_image_folder(folder, classifier.labels)
    test = datasets.decode_images(index.paths, index.targets, classifier.config, progress=False)
    prediction = classifier.predict(test.images)
    correct = prediction.probabilities.argmax(dim=1) == test.targets
    raw = torch.softmax(classifier.logits(test.images), dim=1).max(dim=1).values

    def summary(answered: torch.Tensor) -> dict:
        return answered_summary(correct, ~answered)

    rule = classifier.uncertainty
    confidence = prediction.probabilities.max(dim=1).values
    return {"images": len(test.targets), "top1": round(float(correct.double().mean()), 5),
            "shipped_rule": summary(~prediction.uncertain),
            "flagged_by_distance": round(float((prediction.distances > rule.max_distance).double().mean()), 5),
            "flagged_by_distance_where": flagged_by_distance_where(test.paths, test.targets,
                                                                   prediction.distances > rule.max_distance,
                                                                   train_files, classifier.labels),
            "flagged_by_confidence": round(float((confidence < rule.min_confidence).double().mean()), 5),
            "ratio_rule": answered_summary(correct, ratio_rule.uncertain(
                confidence, class_ratio(rule, prediction.features, prediction.probabilities.argmax(dim=1),
                                        prediction.distances))),
            "plain_top_probability_0.5": summary(raw >= 0.5), "plain_top_probability_0.7": summary(raw >= 0.7)}


if __name__ == "__main__":
    raise SystemExit(main())
