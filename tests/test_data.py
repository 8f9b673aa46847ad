"""Loading image folders: layout, bad files, error exits, the validation split."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from conftest import jpeg_bytes
from fruitserve.handler.preprocessing import PreprocessConfig
from fruitserve.train import data as datasets
from fruitserve.train.synthetic import CLASSES, make_demo_data
from fruitserve.train.train import main as train_main


def _folder(root: Path, layout: dict[str, dict[str, bytes]]) -> Path:
    for class_name, files in layout.items():
        (root / class_name).mkdir(parents=True, exist_ok=True)
        for name, payload in files.items():
            (root / class_name / name).write_bytes(payload)
    return root


def test_bad_files_are_skipped_with_a_warning_naming_them(tmp_path, caplog):
    root = _folder(tmp_path, {
        "Apple": {"a.jpg": jpeg_bytes("Apple Red"), "broken.jpg": jpeg_bytes()[:100], "notes.txt": b"not an image"},
        "Banana": {"b.jpg": jpeg_bytes("Banana"), ".hidden.jpg": jpeg_bytes("Banana"), "empty.png": b""},
    })
    index = datasets.index_image_folder(root)
    assert index.classes == ["Apple", "Banana"]
    assert len(index.paths) == 5  # hidden file not listed
    with caplog.at_level(logging.WARNING):
        decoded = datasets.decode_images(index.paths, index.targets, PreprocessConfig(32), progress=False)
    assert len(decoded.targets) == 2
    assert {p.name for p, _ in decoded.skipped} == {"broken.jpg", "notes.txt", "empty.png"}
    assert "broken.jpg" in caplog.text and "skipped 3 of 5" in caplog.text


def test_fruits360_layout_is_resolved(tmp_path):
    make_demo_data(tmp_path, train_per_class=2, test_per_class=1)
    train, test = datasets.resolve_layout(tmp_path)
    assert train == tmp_path / "Training" and test == tmp_path / "Test"
    assert datasets.index_image_folder(train).classes == sorted(CLASSES)


@pytest.mark.parametrize("case", ["missing", "empty", "one_class", "no_files"])
def test_unusable_dataset_is_a_clear_error(tmp_path, case):
    root = tmp_path / "data"
    if case != "missing":
        root.mkdir()
    if case == "one_class":
        _folder(root, {"Apple": {"a.jpg": jpeg_bytes()}})
    if case == "no_files":
        (root / "Apple").mkdir()
        (root / "Banana").mkdir()
    with pytest.raises(datasets.DatasetError):
        datasets.index_image_folder(datasets.resolve_layout(root)[0])


def test_cli_exits_2_without_traceback(tmp_path, capsys):
    assert train_main(["train", "--data", str(tmp_path / "nope"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err
    (tmp_path / "only").mkdir()
    (tmp_path / "only" / "Apple").mkdir()
    assert train_main(["train", "--data", str(tmp_path / "only"), "--no-progress"]) == 2


def test_evaluation_folder_with_unknown_class_is_rejected(tmp_path):
    root = _folder(tmp_path, {"Durian": {"d.jpg": jpeg_bytes()}})
    with pytest.raises(datasets.DatasetError, match="Durian"):
        datasets.index_image_folder(root, classes=["Apple", "Banana"])


def test_stratified_split_is_deterministic_and_keeps_every_class():
    targets = [0] * 50 + [1] * 20 + [2] * 3
    first = datasets.stratified_split(targets, 0.2, seed=7)
    assert first == datasets.stratified_split(targets, 0.2, seed=7)
    assert first != datasets.stratified_split(targets, 0.2, seed=8)
    train_idx, val_idx = first
    assert not set(train_idx) & set(val_idx) and len(train_idx) + len(val_idx) == len(targets)
    assert [sum(targets[i] == c for i in val_idx) for c in range(3)] == [10, 4, 1]
    assert {targets[i] for i in train_idx} == {0, 1, 2}


def test_stretch_split_holds_out_whole_stretches_of_each_video():
    # class 0: one video, 40 frames numbered 0, 2, 4, ...; class 1: two videos (plain and r_) of 10 frames each;
    # class 2: files not named as video frames, split one by one
    names = ([f"{2 * k}_100.jpg" for k in range(40)] + [f"{k}_100.jpg" for k in range(10)]
             + [f"r_{k}_100.jpg" for k in range(10)] + [f"photo{k}.jpg" for k in range(5)])
    paths, targets = [Path("c") / n for n in names], [0] * 40 + [1] * 20 + [2] * 5
    first = datasets.stretch_split(paths, targets, 0.2, seed=7, stretch=4)
    assert first == datasets.stretch_split(paths, targets, 0.2, seed=7, stretch=4)
    assert first != datasets.stretch_split(paths, targets, 0.2, seed=8, stretch=4)
    train_idx, val_idx = first
    assert not set(train_idx) & set(val_idx) and len(train_idx) + len(val_idx) == len(targets)
    assert [sum(targets[i] == c for i in val_idx) for c in range(3)] == [8, 4, 1]
    assert {targets[i] for i in train_idx} == {0, 1, 2}
    # class 0 lost two whole stretches: positions 4k..4k+3 of its sorted frames, never scattered frames
    positions = [int(names[i].split("_")[0]) // 2 for i in val_idx if targets[i] == 0]
    stretches = {p // 4 for p in positions}
    assert len(stretches) == 2 and sorted(positions) == sorted(4 * s + k for s in stretches for k in range(4))
    # stretches of one frame are random frames: the split fruit-train drew before --val-stretch, so older runs
    # keep theirs; files not named as frames (any image folder) get that very split at any stretch
    assert datasets.stretch_split(paths, targets, 0.2, seed=7, stretch=1) == datasets.stratified_split(targets, 0.2, 7)
    plain = [Path(f"{k:04d}.jpg") for k in range(len(targets))]
    assert datasets.stretch_split(plain, targets, 0.2, seed=7, stretch=4) == datasets.stratified_split(targets, 0.2, 7)
    with pytest.raises(datasets.DatasetError, match="--val-stretch"):
        datasets.stretch_split(paths, targets, 0.2, seed=7, stretch=0)


def test_a_run_is_split_again_as_it_was_trained(tmp_path):
    """``splits_of_run`` (calibration, robustness, the uncertainty bench): stretches for a run that recorded its
    ``val_stretch``, random frames for a run from before it."""
    root = _folder(tmp_path, {c: {f"{k}_100.jpg": b"x" for k in range(20)} for c in ("Apple", "Banana")})
    index = datasets.index_image_folder(root)

    def validation(training: dict) -> list[Path]:
        return [path for path, _ in datasets.splits_of_run({"dataset": {"train_root": str(root)}, "training": training},
                                                           index.classes)[1]]

    stretches = datasets.stretch_split(index.paths, index.targets, 0.25, 3, 4)[1]
    random_frames = datasets.stratified_split(index.targets, 0.25, 3)[1]
    assert stretches != random_frames
    assert validation({"val_fraction": 0.25, "seed": 3, "val_stretch": 4}) == [index.paths[i] for i in stretches]
    assert validation({"val_fraction": 0.25, "seed": 3}) == [index.paths[i] for i in random_frames]


def test_synthetic_generator_is_deterministic(tmp_path):
    a = make_demo_data(tmp_path / "a", train_per_class=2, test_per_class=1, seed=3)
    b = make_demo_data(tmp_path / "b", train_per_class=2, test_per_class=1, seed=3)
    files_a = sorted(p.relative_to(a) for p in a.rglob("*.jpg"))
    assert len(files_a) == len(CLASSES) * 3
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files_a)


def test_frame_gaps_measure_distance_to_the_nearest_trained_frame_of_the_same_video() -> None:
    from fruitserve.train.data import frames_by_video

    from bench.frame_gaps import gap_of_each, trained_frames

    names = ["0_100.jpg", "4_100.jpg", "r_10_100.jpg", "2_100.jpg", "r_30_100.jpg", "notes.txt"]
    videos = frames_by_video([Path(n) for n in names], [0, 0, 0, 1, 0, 0])
    # class and prefix make a video; each frame keeps its index in the list
    assert videos == {(0, ""): [(0, 0), (4, 1)], (0, "r"): [(10, 2), (30, 4)], (1, ""): [(2, 3)]}
    assert trained_frames([Path(n) for n in names], [0, 0, 0, 1, 0, 0]) == {
        (0, ""): [0, 4], (0, "r"): [10, 30], (1, ""): [2]}
    trained = {(0, ""): [0, 4], (0, "r"): [10]}
    # class 1 has no trained frame, photo.jpg is not named as a frame: no gap for either
    queries = ["1_100.jpg", "9_100.jpg", "r_30_100.jpg", "2_100.jpg", "photo.jpg"]
    assert gap_of_each([Path(n) for n in queries], [0, 0, 0, 1, 0], trained) == [1, 5, 20, None, None]
