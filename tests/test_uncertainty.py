"""The uncertainty rule: calibration, the feature distance, what the fit writes, and "uncertain" in every answer."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import read_csv
from fruitserve.batch.cli import main as batch_main
from fruitserve.handler.classifier import load_classifier
from fruitserve.handler.errors import ModelDirError
from fruitserve.handler.preprocessing import load_uint8, resize_and_crop, to_uint8_tensor
from fruitserve.handler.uncertainty import UncertaintyRule, nearest_distance
from fruitserve.train.ood import out_of_distribution, texture
from fruitserve.train.uncertainty import (
    DISTANCE_FLAG_RATE,
    feature_bank,
    fit_min_confidence,
    fit_temperature,
    held_out_views,
)


def test_temperature_fit_recovers_a_known_temperature():
    generator = torch.Generator().manual_seed(0)
    true_logits = torch.randn(4000, 10, generator=generator) * 3
    targets = torch.multinomial(torch.softmax(true_logits, dim=1), 1, generator=generator).squeeze(1)
    # a model twice as sure of itself as it should be: its logits are the true ones times 2
    assert fit_temperature(true_logits * 2, targets) == pytest.approx(2.0, rel=0.1)


def test_nearest_distance_is_the_cosine_distance_to_the_nearest_image_of_the_class():
    generator = torch.Generator().manual_seed(1)
    features, targets = torch.rand(60, 8, generator=generator), torch.arange(3).repeat(20)
    bank = feature_bank(features, targets, 3)
    assert bank["offsets"].tolist() == [0, 20, 40, 60]
    assert (targets[bank["order"]].diff() >= 0).all()  # grouped by class, in the order of the offsets
    queries, classes = torch.rand(5, 8, generator=generator), torch.tensor([0, 1, 2, 1, 0])
    expected = torch.stack([
        1 - torch.nn.functional.cosine_similarity(q[None], features[targets == c]).max()
        for q, c in zip(queries, classes, strict=True)])
    got = nearest_distance(queries, classes, bank["features"], bank["offsets"])
    torch.testing.assert_close(got, expected, atol=2e-3, rtol=0)  # the bank is kept at float16 precision
    # a training image is at distance ~0 from itself, whatever its scale
    assert float(nearest_distance(3 * features[:1], targets[:1], bank["features"], bank["offsets"])) < 1e-3
    # held-out rows are not looked at: with every row of its class held out, a row is at distance 1
    excluded = torch.zeros(5, 60, dtype=torch.bool)
    excluded[0, :20] = True
    held = nearest_distance(queries, classes, bank["features"], bank["offsets"], excluded)
    assert float(held[0]) == 1.0 and torch.allclose(held[1:], got[1:])


def test_nearest_other_distance_is_the_distance_to_the_nearest_image_of_any_other_class():
    from bench.uncertainty import nearest_other_distance

    generator = torch.Generator().manual_seed(2)
    features, targets = torch.rand(60, 8, generator=generator), torch.tensor([0] * 10 + [1] * 20 + [2] * 30)
    bank = feature_bank(features, targets, 3)
    queries, classes = torch.rand(7, 8, generator=generator), torch.tensor([0, 1, 2, 1, 0, 2, 2])
    expected = torch.stack([
        1 - torch.nn.functional.cosine_similarity(q[None], features[targets != c]).max()
        for q, c in zip(queries, classes, strict=True)])
    got = nearest_other_distance(queries, classes, bank["features"], bank["offsets"], chunk=3)  # chunks of 3 rows
    torch.testing.assert_close(got, expected, atol=2e-3, rtol=0)
    # a training image is ~0 from its own class, but not from the others
    own = features[:1]
    assert float(nearest_other_distance(own, torch.tensor([0]), bank["features"], bank["offsets"])) > 1e-3
    assert float(nearest_other_distance(own, torch.tensor([1]), bank["features"], bank["offsets"])) < 1e-3


def test_held_out_views_are_the_frames_of_the_same_video_nearby():
    names = ["10_100.jpg", "r_10_100.jpg", "photo.jpg"]
    bank = ["0_100.jpg", "12_100.jpg", "40_100.jpg", "r_12_100.jpg", "12_100.jpg", "photo.jpg"]
    bank_targets = torch.tensor([0, 0, 0, 0, 1, 0])
    held = held_out_views([Path(n) for n in names], torch.tensor([0, 0, 0]), [Path(n) for n in bank], bank_targets,
                          frames=10)
    assert held.tolist() == [
        [True, True, False, False, False, False],  # same video (class 0, no prefix) within 10 frames
        [False, False, False, True, False, False],  # the "r" video is another video
        [False, False, False, False, False, False],  # not named as a frame: nothing held out
    ]


def test_min_confidence_is_the_lowest_threshold_whose_answers_are_right_enough():
    # 1,000 answers at confidence 0.95 (all right) and 10 at 0.65 (all wrong): only thresholds above 0.65 keep
    # what is answered at least 99.8 % right
    probabilities = torch.tensor([[0.95, 0.05]] * 1000 + [[0.65, 0.35]] * 10)
    targets = torch.tensor([0] * 1000 + [1] * 10)
    distances = torch.zeros(1010)
    chosen, table = fit_min_confidence(probabilities, distances, targets, max_distance=1.0)
    assert chosen == 0.7 and table["0.6"]["accuracy_answered"] < 0.998 <= table["0.7"]["accuracy_answered"]
    # the distance counts too: with the wrong answers beyond max_distance, the lowest threshold is enough
    far = torch.cat([torch.zeros(1000), torch.ones(10)])
    assert fit_min_confidence(probabilities, far, targets, max_distance=0.5)[0] == 0.5


def test_rule_flags_low_confidence_or_far_inputs():
    bank = feature_bank(torch.tensor([[1.0, 0, 0], [0, 1, 0]]), torch.tensor([0, 1]), 2)
    rule = UncertaintyRule(temperature=2.0, min_confidence=0.6, max_distance=0.5, bank=bank["features"],
                           offsets=bank["offsets"])
    confidence = torch.tensor([0.9, 0.5, 0.9])
    distance = rule.distance(torch.tensor([[1.0, 0.1, 0], [1, 0, 0], [1, 0, 0]]), torch.tensor([0, 0, 1]))
    torch.testing.assert_close(distance, torch.tensor([1 - 1 / 1.01 ** 0.5, 0.0, 1.0]), atol=1e-3, rtol=0)
    assert rule.uncertain(confidence, distance).tolist() == [False, True, True]
    assert torch.allclose(rule.calibrated(torch.tensor([[2.0, 0.0]])), torch.softmax(torch.tensor([[1.0, 0.0]]), 1))
    assert rule.with_overrides({"max_distance": 2}).uncertain(confidence, distance).tolist() == [False, True, False]
    # the whole rule from logits: the distance is to the class the calibrated softmax names
    logits = torch.tensor([[4.0, 0.0], [0.2, 0.0], [0.0, 4.0]])
    probabilities, assessed, flagged = rule.assess(logits, torch.tensor([[1.0, 0.1, 0], [1, 0, 0], [1, 0, 0]]))
    torch.testing.assert_close(probabilities, rule.calibrated(logits))
    torch.testing.assert_close(assessed, distance)
    assert flagged.tolist() == [False, True, True]
    with pytest.raises(ValueError, match="feature statistics"):
        UncertaintyRule().with_overrides({"max_distance": 1})


def test_a_run_fitted_with_another_score_is_served_on_confidence_only(trained_run: Path, tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture):
    meta = json.loads((trained_run / "metadata.json").read_text())
    old = meta["uncertainty"] | {"score": "mahalanobis", "max_distance": 2574.6}
    with caplog.at_level("WARNING"):
        rule = UncertaintyRule.from_run(meta | {"uncertainty": old}, trained_run)
    assert rule.bank is None and rule.max_distance is None and rule.min_confidence == old["min_confidence"]
    assert "fruit-train calibrate" in caplog.text
    # statistics whose offsets do not match their rows are refused, not served wrong
    with np.load(trained_run / "feature_stats.npz") as stats:
        np.savez(tmp_path / "feature_stats.npz", features=stats["features"], offsets=stats["offsets"][:-1])
    with pytest.raises(ModelDirError, match="offsets"):
        UncertaintyRule.from_run(meta, tmp_path)
    # nor statistics of another class count (a bank copied from another run): class indices would run past them
    with pytest.raises(ModelDirError, match="classes"):
        UncertaintyRule.from_run(meta | {"num_classes": meta["num_classes"] + 1}, trained_run)


def test_the_fit_is_recorded_and_used_by_the_loader(trained_run: Path, demo_data: Path):
    meta = json.loads((trained_run / "metadata.json").read_text())
    fitted = meta["uncertainty"]
    assert (trained_run / "feature_stats.npz").is_file() and (trained_run / "uncertainty_scores.png").is_file()
    assert (trained_run / "reliability.png").is_file()
    assert fitted["temperature"] > 0 and fitted["max_distance"] > 0 and fitted["score"] == "nearest_neighbour"
    assert set(fitted["out_of_distribution"]) == {"shifted", "composites", "textures"}
    # textures are no fruit at all: flagged far more often than the validation images the rule must answer
    assert fitted["out_of_distribution"]["textures"]["flagged"] > 1 - fitted["validation"]["answered"]
    assert meta["metrics"]["test"]["answered"] <= 1 and "accuracy_answered" in meta["metrics"]["test"]
    classifier = load_classifier(trained_run, device="cpu", precision="fp32")
    assert classifier.uncertainty.temperature == pytest.approx(fitted["temperature"])
    assert classifier.uncertainty.max_distance == pytest.approx(fitted["max_distance"])
    images = [load_uint8(p.read_bytes(), classifier.config) for p in sorted((demo_data / "Test").rglob("*.*"))[:16]]
    answers = classifier.answers(torch.stack(images), [3] * 16)
    assert all(isinstance(a["uncertain"], bool) and 0 <= a["ood_score"] <= 1 for a in answers)
    flags = [a["uncertain"] for a in answers]
    expected = [a["confidence"] < fitted["min_confidence"] or a["ood_score"] > fitted["max_distance"] for a in answers]
    assert flags == expected
    strict = load_classifier(trained_run, device="cpu", precision="fp32", uncertainty={"max_distance": -1.0})
    assert all(a["uncertain"] for a in strict.answers(torch.stack(images), [1] * 16))


def test_distance_threshold_keeps_the_fitted_share_of_validation(trained_run: Path):
    """The threshold is the percentile of validation measured with its neighbours held out, which can only be
    farther than validation as it is: on validation the distance alone flags at most about ``DISTANCE_FLAG_RATE``
    (one image more on a small split)."""
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
    assert all(r["uncertain"] in ("true", "false") and 0 <= float(r["ood_score"]) <= 1 for r in rows)
    result = CliRunner().invoke(batch_main, [*args[:2], str(tmp_path / "b.csv"), *args[3:], "--max-distance", "0"])
    assert result.exit_code == 0 and all(r["uncertain"] == "true" for r in read_csv(tmp_path / "b.csv"))
