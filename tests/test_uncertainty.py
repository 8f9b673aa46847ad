"""The uncertainty rule: calibration, the feature distance, what the fit writes, and "uncertain" in every answer."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import read_csv
from fruitserve.batch.cli import main as batch_main
from fruitserve.handler.classifier import load_classifier
from fruitserve.handler.preprocessing import load_uint8, resize_and_crop, to_uint8_tensor
from fruitserve.handler.uncertainty import UncertaintyRule, mahalanobis
from fruitserve.train.ood import out_of_distribution, texture
from fruitserve.train.uncertainty import DISTANCE_FLAG_RATE, fit_feature_stats, fit_temperature


def test_temperature_fit_recovers_a_known_temperature():
    generator = torch.Generator().manual_seed(0)
    true_logits = torch.randn(4000, 10, generator=generator) * 3
    targets = torch.multinomial(torch.softmax(true_logits, dim=1), 1, generator=generator).squeeze(1)
    # a model twice as sure of itself as it should be: its logits are the true ones times 2
    assert fit_temperature(true_logits * 2, targets) == pytest.approx(2.0, rel=0.1)


def test_mahalanobis_matches_the_definition_and_grows_away_from_the_data():
    generator = torch.Generator().manual_seed(1)
    targets = torch.arange(3).repeat(200)
    centres = torch.tensor([[0.0, 0, 0, 0], [5, 0, 0, 0], [0, 5, 0, 0]])
    features = centres[targets] + torch.randn(600, 4, generator=generator) * torch.tensor([1.0, 2, 0.5, 1])
    stats = fit_feature_stats(features, targets, 3)
    means, precision = stats["class_means"].double(), stats["precision"].double()
    points = torch.tensor([[5.0, 0, 0, 0], [0, 0, 6, 0]], dtype=torch.float64)
    direct = torch.stack([torch.stack([(p - m) @ precision @ (p - m) for m in means]) for p in points])
    torch.testing.assert_close(mahalanobis(points, means, precision), direct)
    # the rule keeps each mean's own term from its construction: same distances
    rule = UncertaintyRule(max_distance=1.0, class_means=means.float(), precision_matrix=precision.float())
    torch.testing.assert_close(rule.distance(points.float()), direct.min(dim=1).values.float(), rtol=1e-4, atol=1e-3)
    near, far = mahalanobis(points, means, precision).min(dim=1).values
    assert near < 1 and far > 50  # a class mean vs a point 12 standard deviations out in a narrow direction


def test_rule_flags_low_confidence_or_far_inputs():
    means = torch.zeros(2, 3)
    rule = UncertaintyRule(temperature=2.0, min_confidence=0.6, max_distance=10.0, class_means=means,
                           precision_matrix=torch.eye(3))
    confidence = torch.tensor([0.9, 0.5, 0.9])
    distance = rule.distance(torch.tensor([[1.0, 0, 0], [1, 0, 0], [4, 0, 0]]))
    assert distance.tolist() == [1.0, 1.0, 16.0]
    assert rule.uncertain(confidence, distance).tolist() == [False, True, True]
    assert torch.allclose(rule.calibrated(torch.tensor([[2.0, 0.0]])), torch.softmax(torch.tensor([[1.0, 0.0]]), 1))
    assert rule.with_overrides({"max_distance": 20}).uncertain(confidence, distance).tolist() == [False, True, False]
    with pytest.raises(ValueError, match="feature statistics"):
        UncertaintyRule().with_overrides({"max_distance": 1})


def test_the_fit_is_recorded_and_used_by_the_loader(trained_run: Path, demo_data: Path):
    meta = json.loads((trained_run / "metadata.json").read_text())
    fitted = meta["uncertainty"]
    assert (trained_run / "feature_stats.npz").is_file() and (trained_run / "uncertainty_scores.png").is_file()
    assert (trained_run / "reliability.png").is_file()
    assert fitted["temperature"] > 0 and fitted["max_distance"] > 0 and fitted["score"] == "mahalanobis"
    assert set(fitted["out_of_distribution"]) == {"shifted", "composites", "textures"}
    # textures are no fruit at all: flagged far more often than the validation images the rule must answer
    assert fitted["out_of_distribution"]["textures"]["flagged"] > 1 - fitted["validation"]["answered"]
    assert meta["metrics"]["test"]["answered"] <= 1 and "accuracy_answered" in meta["metrics"]["test"]
    classifier = load_classifier(trained_run, device="cpu", precision="fp32")
    assert classifier.uncertainty.temperature == pytest.approx(fitted["temperature"])
    assert classifier.uncertainty.max_distance == pytest.approx(fitted["max_distance"])
    images = [load_uint8(p.read_bytes(), classifier.config) for p in sorted((demo_data / "Test").rglob("*.*"))[:16]]
    answers = classifier.answers(torch.stack(images), [3] * 16)
    assert all(isinstance(a["uncertain"], bool) and a["ood_score"] > 0 for a in answers)
    flags = [a["uncertain"] for a in answers]
    expected = [a["confidence"] < fitted["min_confidence"] or a["ood_score"] > fitted["max_distance"] for a in answers]
    assert flags == expected
    strict = load_classifier(trained_run, device="cpu", precision="fp32", uncertainty={"max_distance": 0.0})
    assert all(a["uncertain"] for a in strict.answers(torch.stack(images), [1] * 16))


def test_distance_threshold_keeps_the_fitted_share_of_validation(trained_run: Path):
    """The threshold is the validation split's percentile: on validation, the distance alone flags about
    ``DISTANCE_FLAG_RATE`` (one image more or less on a small split)."""
    from fruitserve.train import data as datasets

    classifier = load_classifier(trained_run, device="cpu", precision="fp32")
    files = datasets.validation_of_run(classifier.metadata, classifier.labels)
    val = datasets.decode_images([p for p, _ in files], [t for _, t in files], classifier.config, progress=False)
    distances = classifier.predict(val.images).distances
    share = float((distances > classifier.uncertainty.max_distance).double().mean())
    assert share <= DISTANCE_FLAG_RATE + 1 / len(distances)


def test_out_of_distribution_images_are_drawn_deterministically(demo_data: Path):
    from PIL import Image

    images = [Image.open(p).convert("RGB") for p in sorted((demo_data / "Test").rglob("*.*"))[:12]]
    first, again = out_of_distribution(images, 5, seed=3), out_of_distribution(images, 5, seed=3)
    assert {k: len(v) for k, v in first.items()} == {"shifted": 5, "composites": 5, "textures": 5}
    for name in first:
        assert all(a.tobytes() == b.tobytes() for a, b in zip(first[name], again[name], strict=True))
    tensor = to_uint8_tensor(resize_and_crop(texture((100, 100), random.Random(0)), 48))
    assert tensor.shape == (3, 48, 48)


def test_fruit_batch_counts_and_overrides_uncertain_rows(demo_data: Path, model_store: Path, tmp_path: Path):
    args = ["score", str(demo_data / "Test"), str(tmp_path / "a.csv"), "--local", "--model",
            str(model_store / "fruit.mar"), "--quiet"]
    result = CliRunner().invoke(batch_main, args)
    assert result.exit_code == 0, result.output
    rows = read_csv(tmp_path / "a.csv")
    flagged = sum(r["uncertain"] == "true" for r in rows)
    assert f"({flagged} uncertain)" in result.stderr
    assert all(r["uncertain"] in ("true", "false") and float(r["ood_score"]) > 0 for r in rows)
    result = CliRunner().invoke(batch_main, [*args[:2], str(tmp_path / "b.csv"), *args[3:], "--max-distance", "0"])
    assert result.exit_code == 0 and all(r["uncertain"] == "true" for r in read_csv(tmp_path / "b.csv"))
