"""How the served model holds up away from Fruits-360's white studio background: a stand-in for shop photos.

    .venv/bin/python -m bench.robustness --run runs/<run> [--split validation|test]

The real shop photos are held out, so this measures what can be measured here. Images get shifts applied
at their own 100 px resolution, *before* the shared preprocessing, as a camera would give them. By default
the images are the run's own validation split (carved from Training by the run's seed, never trained on),
so that choosing a recipe by these numbers never looks at Test; ``--split test`` takes a stratified subset
of the official Test split instead, to report. The shifts:
- procedural backgrounds (wood-like stripes, a checkerboard, coloured noise): training replaces the
  background with flat colours, smooth colour fields and a clutter of other fruit, never these;
- the fruit at 55 % of the frame and off-centre, on white and on those backgrounds: *inside* the 45-80 %
  that training draws for 30 % of its samples (added after this benchmark showed the gap), so this row
  checks that the recipe covers it;
- the fruit at 35 % of the frame, below anything training draws;
- warm or cool light with gamma 0.6-1.6: stronger than training's (cast +-10 %, gamma 0.75-1.33);
- motion blur plus JPEG at quality 25 (training blurs with a Gaussian, never compresses);
- all of these at once.

Accuracy and macro-F1 per condition, and the drop from clean, go to bench/results/robustness-<split>.json; a strip
of eight shifted images per condition goes to RUN/robustness/ to look at.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch
from fruitserve.handler.classifier import load_classifier
from fruitserve.handler.preprocessing import decode_image, resize_and_crop, to_uint8_tensor
from fruitserve.train import data as datasets
from fruitserve.train.ood import CONDITIONS
from fruitserve.train.reports import classification_metrics
from PIL import Image

from bench.report import ROOT, save_results


def pick_images(data: Path, split: str, labels: list[str], metadata: dict, per_class: int,
                rng: random.Random) -> list[tuple[Path, int]]:
    """Up to ``per_class`` images of every class from the run's validation split or from Test."""
    if split == "validation":
        by_class: dict[int, list[Path]] = {}
        for path, target in datasets.validation_of_run(metadata, labels):
            by_class.setdefault(target, []).append(path)
    else:
        by_class = {t: list((data / "Test" / name).glob("*.jpg")) for t, name in enumerate(labels)}
    samples = []
    for target in range(len(labels)):
        files = sorted(by_class.get(target, []))
        samples += [(p, target) for p in rng.sample(files, min(per_class, len(files)))]
    return samples


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/fruits-360")
    parser.add_argument("--split", choices=("validation", "test"), default="validation")
    parser.add_argument("--per-class", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--precision", default="auto", help="the precision the classifier runs in, as served")
    args = parser.parse_args()

    classifier = load_classifier(args.run, device="cpu", precision=args.precision)
    labels, metadata, config = classifier.labels, classifier.metadata, classifier.config
    samples = pick_images(args.data, args.split, labels, metadata, args.per_class, random.Random(args.seed))
    targets = torch.tensor([t for _, t in samples])
    originals = [decode_image(p.read_bytes(), config.max_pixels) for p, _ in samples]

    results: dict = {"images": len(samples), "split": args.split, "classes": len(labels), "run": str(args.run),
                     "precision": classifier.precision, "conditions": {}}
    clean_top1 = None
    for name, shift in CONDITIONS.items():
        shift_rng = random.Random(args.seed + 1)
        images = originals if shift is None else [shift(im, shift_rng) for im in originals]
        batch = torch.stack([to_uint8_tensor(resize_and_crop(im, config.input_size)) for im in images])
        metrics = classification_metrics(classifier.logits(batch), targets, labels)
        clean_top1 = metrics["top1"] if clean_top1 is None else clean_top1
        results["conditions"][name] = {"top1": round(metrics["top1"], 4), "macro_f1": round(metrics["macro_f1"], 4),
                                       "top1_drop": round(clean_top1 - metrics["top1"], 4)}
        print(name, results["conditions"][name], flush=True)
        if shift is not None:
            # a look at the shifted images; next to the run, because they are Fruits-360 pixels (never committed)
            strip = Image.new("RGB", (100 * 8, 100))
            for j in range(8):
                strip.paste(images[j * len(images) // 8].resize((100, 100)), (100 * j, 0))
            (args.run / "robustness").mkdir(exist_ok=True)
            strip.save(args.run / "robustness" / f"{name}.png")
    save_results(f"robustness-{args.split}", results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
