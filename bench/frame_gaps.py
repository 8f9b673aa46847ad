"""How far, in frames of its rotation video, each image lies from the nearest frame the model trained on.

    .venv/bin/python -m bench.frame_gaps [--data ../shared/data/fruits-360] [--val-fraction 0.1] [--seed 0]

Fruits-360 names every image ``[rN_]<frame>_100.jpg``: one video per class and prefix. A validation split of
random frames (``--val-stretch 1``) leaves each validation frame trained neighbours a few frames away; Test holds
whole stretches of the same videos that Training lacks. So an uncertainty threshold fitted on such a validation
sees nearer views than Test brings. ``train/data.stretch_split`` holds out whole stretches instead: this measures
both sides for each stretch in ``STRETCHES``. Reads file names only, never pixels. Writes
``bench/results/frame_gaps.json``.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from fruitserve.train import data as datasets

from bench.report import DEFAULT_IMAGES, save_results

STRETCHES = (1, 4, 6, 8, 10, 12)


def trained_frames(paths: list[Path], targets: list[int]) -> dict[datasets.Video, list[int]]:
    """The frame numbers of each video among the files the model trained on."""
    return {video: [frame for frame, _ in frames]
            for video, frames in datasets.frames_by_video(paths, targets).items()}


def gap_of_each(paths: list[Path], targets: list[int], trained: dict[datasets.Video, list[int]]) -> list[int | None]:
    """Each image's distance in frames to the nearest trained frame of its video; None for a file not named as a
    frame or a video with no trained frame."""
    out: list[int | None] = []
    for path, target in zip(paths, targets, strict=True):
        named = datasets.video_frame(path)
        frames = trained.get((target, named[0])) if named else None
        out.append(min(abs(named[1] - t) for t in frames) if frames else None)
    return out


def summary(values: list[int]) -> dict:
    cuts = statistics.quantiles(values, n=100)
    return {"images": len(values), "median": cuts[49], "p90": cuts[89], "p99": cuts[98],
            "share_over_8": round(sum(v > 8 for v in values) / len(values), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_IMAGES.parent)
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    training = datasets.index_image_folder(args.data / "Training")
    test = datasets.index_image_folder(args.data / "Test", training.classes)
    results: dict = {"val_fraction": args.val_fraction, "seed": args.seed, "by_val_stretch": {}}
    for stretch in STRETCHES:
        train_idx, val_idx = datasets.stretch_split(training.paths, training.targets, args.val_fraction, args.seed,
                                                    stretch)
        pick = lambda idx: ([training.paths[i] for i in idx], [training.targets[i] for i in idx])  # noqa: E731
        trained = trained_frames(*pick(train_idx))
        results["by_val_stretch"][str(stretch)] = {
            name: summary([g for g in gap_of_each(paths, targets, trained) if g is not None])
            for name, (paths, targets) in (("validation", pick(val_idx)), ("test", (test.paths, test.targets)))}
    save_results("frame_gaps", results)


if __name__ == "__main__":
    main()
