"""Image-folder datasets (``ROOT/<class>/<image>``) decoded once into memory.

Fruits-360 images are 100x100, so the whole training split fits in RAM as uint8 at
model resolution; augmenting batched tensors then beats per-image DataLoader workers
on a 2-core CPU, where worker processes would compete with the forward pass.
"""

from __future__ import annotations

import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from fruitserve.handler.errors import InputError
from fruitserve.handler.preprocessing import PreprocessConfig, load_uint8

from .utils import dataset_fingerprint
from .utils import progress as progress_bar

log = logging.getLogger(__name__)


# Fruits-360 names every image ``[rN_]<frame>_100.jpg``: frame <frame> of the rotation video of its class and prefix
FRAME_NAME = re.compile(r"^(?:(r\d?)_)?(\d+)_100\.jpg$")


def video_frame(path: Path) -> tuple[str, int] | None:
    """(video prefix, frame number) for a file named as a Fruits-360 frame, else None."""
    match = FRAME_NAME.match(path.name)
    return (match.group(1) or "", int(match.group(2))) if match else None


class DatasetError(Exception):
    """The dataset cannot be used at all (missing, empty, too few classes): exit code 2."""


@dataclass
class ImageFolderIndex:
    root: Path
    classes: list[str]
    paths: list[Path]
    targets: list[int]

    def fingerprint(self) -> str:
        return dataset_fingerprint(
            (str(p.relative_to(self.root)), p.stat().st_size) for p in self.paths
        )


@dataclass
class DecodedImages:
    images: torch.Tensor  # N x 3 x S x S uint8
    targets: torch.Tensor  # N int64
    paths: list[Path]
    skipped: list[tuple[Path, str]]


def resolve_layout(data: Path) -> tuple[Path, Path | None]:
    """``ROOT`` with ``Training/`` (and ``Test/``) as in Fruits-360, or ``ROOT`` itself as the training set."""
    if not data.exists():
        raise DatasetError(f"dataset folder does not exist: {data}")
    if not data.is_dir():
        raise DatasetError(f"dataset path is not a folder: {data}")
    training = data / "Training"
    if training.is_dir():
        test = data / "Test"
        return training, test if test.is_dir() else None
    return data, None


def _visible(name: str) -> bool:
    return not name.startswith(".")


def find_classes(root: Path, min_classes: int = 2) -> list[str]:
    if not root.is_dir():
        raise DatasetError(f"dataset folder does not exist: {root}")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and _visible(e.name))
    if len(classes) < min_classes:
        raise DatasetError(
            f"{root} has {len(classes)} class folder(s); expected ROOT/<class>/<image> with at least {min_classes}"
        )
    return classes


def index_image_folder(root: Path, classes: list[str] | None = None) -> ImageFolderIndex:
    """Every visible file under each class folder, in a deterministic order.

    With ``classes`` given (the training classes), folders must be a subset of them so
    that evaluation maps names to the model's indices.
    """
    root = Path(root)
    found = find_classes(root, min_classes=1 if classes is not None else 2)
    if classes is None:
        classes = found
    else:
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise DatasetError(f"{root} has classes the model does not know: {', '.join(unknown[:10])}")
    class_to_idx = {name: i for i, name in enumerate(classes)}
    paths: list[Path] = []
    targets: list[int] = []
    for name in found:
        for dirpath, dirnames, filenames in os.walk(root / name, followlinks=False):
            dirnames[:] = sorted(d for d in dirnames if _visible(d))
            for filename in sorted(f for f in filenames if _visible(f)):
                paths.append(Path(dirpath) / filename)
                targets.append(class_to_idx[name])
    if not paths:
        raise DatasetError(f"no files found under {root}")
    return ImageFolderIndex(root=root, classes=classes, paths=paths, targets=targets)


def stratified_split(targets: list[int], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Per-class random split, the same for the same seed; every class keeps at least one training image."""
    if not 0.0 < val_fraction < 1.0:
        raise DatasetError(f"--val-fraction must be between 0 and 1, got {val_fraction}")
    generator = torch.Generator().manual_seed(seed)
    by_class: dict[int, list[int]] = {}
    for i, t in enumerate(targets):
        by_class.setdefault(t, []).append(i)
    train_idx: list[int] = []
    val_idx: list[int] = []
    for t in sorted(by_class):
        members = by_class[t]
        order = torch.randperm(len(members), generator=generator).tolist()
        n_val = min(len(members) - 1, round(len(members) * val_fraction))
        val_idx += [members[i] for i in order[:n_val]]
        train_idx += [members[i] for i in order[n_val:]]
    return sorted(train_idx), sorted(val_idx)


Video = tuple[int, str]  # (class id, file-name prefix): one rotation video of Fruits-360


def frames_by_video(paths: list[Path], targets: list[int]) -> dict[Video, list[tuple[int, int]]]:
    """The files named as video frames, by video: (frame number, index in ``paths``) each, in file order. The one
    grouping the split, the fit's hold-out and ``bench/frame_gaps.py`` share."""
    videos: dict[Video, list[tuple[int, int]]] = {}
    for i, (path, target) in enumerate(zip(paths, targets, strict=True)):
        named = video_frame(path)
        if named is not None:
            videos.setdefault((target, named[0]), []).append((named[1], i))
    return videos


def frame_stretches(paths: list[Path], targets: list[int], stretch: int) -> dict[int, list[list[int]]]:
    """Per class, indices grouped into runs of ``stretch`` consecutive frames of one video; a file not named as a
    video frame is a group of its own."""
    groups: dict[int, list[list[int]]] = {}
    for i, (path, target) in enumerate(zip(paths, targets, strict=True)):
        if video_frame(path) is None:
            groups.setdefault(target, []).append([i])
    for (target, _), frames in sorted(frames_by_video(paths, targets).items()):
        order = [i for _, i in sorted(frames)]
        groups.setdefault(target, []).extend(order[k:k + stretch] for k in range(0, len(order), stretch))
    return groups


def stretch_split(paths: list[Path], targets: list[int], val_fraction: float, seed: int,
                  stretch: int) -> tuple[list[int], list[int]]:
    """Per-class split that holds out whole stretches of ``stretch`` consecutive video frames, as Fruits-360's Test
    does, so that validation holds what Test holds: the same fruits from angles the model did not train on.
    Neighbouring frames are near-copies; a random split (``stretch`` 1, ``stratified_split``) leaves each
    validation frame a trained twin a few frames away, and whatever is fitted on it (the uncertainty thresholds)
    sees easier inputs than Test brings. Files not named as frames are split at random; the same seed gives the
    same split, and every class keeps at least one training image."""
    if stretch < 1:
        raise DatasetError(f"--val-stretch must be at least 1 frame, got {stretch}")
    if stretch == 1:
        return stratified_split(targets, val_fraction, seed)
    if not 0.0 < val_fraction < 1.0:
        raise DatasetError(f"--val-fraction must be between 0 and 1, got {val_fraction}")
    generator = torch.Generator().manual_seed(seed)
    groups = frame_stretches(paths, targets, stretch)
    val_idx: list[int] = []
    for target in sorted(groups):
        blocks = groups[target]
        size = sum(len(b) for b in blocks)
        want = min(size - 1, round(size * val_fraction))
        for k in torch.randperm(len(blocks), generator=generator).tolist():
            if want <= 0:
                break
            taken = blocks[k][:want]  # the last stretch cut short, so every class gets its share exactly
            val_idx += taken
            want -= len(taken)
    held_out = set(val_idx)
    return [i for i in range(len(targets)) if i not in held_out], sorted(val_idx)


def val_stretch_of(training: dict) -> int:
    """The stretch a run's validation was held out in, from its options (``metadata["training"]`` or fruit-train's
    own): 1 (random frames) for runs from before ``--val-stretch``, and for a ``--val-dir``, which is not split."""
    return 1 if training.get("val_dir") else int(training.get("val_stretch") or 1)


def split_of_args(paths: list[Path], targets: list[int], training: dict) -> tuple[list[int], list[int]]:
    """The split of Training a run's options name."""
    return stretch_split(paths, targets, float(training["val_fraction"]), int(training["seed"]),
                         val_stretch_of(training))


def splits_of_run(metadata: dict, classes: list[str]) -> tuple[list[tuple[Path, int]], list[tuple[Path, int]]]:
    """A trained run's own training and validation images (path, class id): its Training folder, split again by
    the run's seed and fraction (or its ``--val-dir``), so that work after training (calibration, robustness)
    uses what the run used, and never looks at Test."""
    training = metadata["training"]
    index = index_image_folder(Path(metadata["dataset"]["train_root"]), classes)
    items = list(zip(index.paths, index.targets, strict=True))
    if training.get("val_dir"):
        val_index = index_image_folder(Path(training["val_dir"]), classes)
        return items, list(zip(val_index.paths, val_index.targets, strict=True))
    train_idx, val_idx = split_of_args(index.paths, index.targets, training)
    return [items[i] for i in train_idx], [items[i] for i in val_idx]


def validation_of_run(metadata: dict, classes: list[str]) -> list[tuple[Path, int]]:
    return splits_of_run(metadata, classes)[1]


def _load_one(path: Path, config: PreprocessConfig) -> torch.Tensor | str:
    try:
        return load_uint8(path.read_bytes(), config)
    except InputError as exc:
        return str(exc)
    except OSError as exc:
        return f"cannot read file: {exc}"


def decode_images(
    paths: list[Path],
    targets: list[int],
    config: PreprocessConfig,
    desc: str = "decode",
    threads: int | None = None,
    progress: bool = True,
) -> DecodedImages:
    """Decode files through the shared preprocessing; unreadable ones are skipped with a warning naming them."""
    threads = threads or min(4, os.cpu_count() or 1)
    kept_images: list[torch.Tensor] = []
    kept_targets: list[int] = []
    kept_paths: list[Path] = []
    skipped: list[tuple[Path, str]] = []
    # PIL releases the GIL while decoding, so threads give real parallelism here.
    with ThreadPoolExecutor(max_workers=threads) as pool:
        results = pool.map(lambda p: _load_one(p, config), paths, chunksize=64)
        for path, target, result in progress_bar(zip(paths, targets, results, strict=True), total=len(paths),
                                                 desc=desc, unit="img", disable=not progress):
            if isinstance(result, str):
                log.warning("skipping %s: %s", path, result)
                skipped.append((path, result))
                continue
            kept_images.append(result)
            kept_targets.append(target)
            kept_paths.append(path)
    if skipped:
        log.warning("%s: skipped %d of %d files that are not readable images", desc, len(skipped), len(paths))
    if not kept_images:
        raise DatasetError(f"{desc}: none of the {len(paths)} files is a readable image")
    return DecodedImages(
        images=torch.stack(kept_images),
        targets=torch.tensor(kept_targets, dtype=torch.int64),
        paths=kept_paths,
        skipped=skipped,
    )
