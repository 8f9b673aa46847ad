"""``fruit-batch score``: every file gets one row, local equals server, kills and outages lose nothing."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import image_bytes, jpeg_bytes, read_csv, start_fruit_batch, wait_for_rows
from fruitserve.batch.cli import main as batch_main
from fruitserve.batch.results import COLUMNS, read_rows
from fruitserve.batch.sources import LocalFolder
from fruitserve.model_store.torchserve_process import TorchServe
from fruitserve.train.train import main as train_main
from PIL import Image


@pytest.fixture(scope="module")
def messy_folder(demo_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real class folders plus every kind of bad file, nested."""
    root = tmp_path_factory.mktemp("messy")
    shutil.copytree(demo_data / "Test", root / "images")
    nested = root / "images" / "Lime" / "more" / "deeper"
    nested.mkdir(parents=True)
    (nested / "lime.jpg").write_bytes(jpeg_bytes("Lime", seed=77))
    (root / "images" / "Banana" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + os.urandom(500))
    (root / "images" / "Banana" / "empty.jpg").write_bytes(b"")
    (root / "images" / "Kiwi" / "text.png").write_bytes(b"this is text, not a picture")
    (root / "images" / "Kiwi" / "png_named.txt").write_bytes(image_bytes(Image.new("RGB", (50, 50), (120, 90, 40)),
                                                                             "PNG"))
    (root / "images" / "Kiwi" / "truncated.jpg").write_bytes(jpeg_bytes("Kiwi", seed=5)[:400])
    (root / "images" / "Orange" / "notes.md").write_text("not a candidate: wrong extension and not an image")
    (root / "images" / "Orange" / ".hidden.jpg").write_bytes(jpeg_bytes("Orange"))
    return root / "images"


BAD_FILES = {"Banana/corrupt.jpg": "400", "Banana/empty.jpg": "400", "Kiwi/text.png": "415",
             "Kiwi/truncated.jpg": "400"}


def find_images(root: Path) -> tuple[list[str], int]:
    return LocalFolder(root).list()


def test_find_images_order_hidden_content_and_symlink_loops(messy_folder: Path, tmp_path: Path):
    names, ignored = find_images(messy_folder)
    assert names == sorted(names) and len(names) == len(set(names))
    assert "Kiwi/png_named.txt" in names and "Lime/more/deeper/lime.jpg" in names
    assert "Orange/notes.md" not in names and not any(".hidden" in n for n in names)
    assert ignored == 1
    loop = tmp_path / "loop"
    (loop / "a").mkdir(parents=True)
    (loop / "a" / "x.jpg").write_bytes(jpeg_bytes())
    (loop / "a" / "back").symlink_to(loop, target_is_directory=True)
    found, _ = find_images(loop)
    assert found == ["a/x.jpg"]


def test_local_scoring_gives_every_file_one_row(messy_folder: Path, model_store: Path, tmp_path: Path):
    out = tmp_path / "out.csv"
    result = CliRunner().invoke(batch_main, ["score", str(messy_folder), str(out), "--local", "--model",
                                             str(model_store / "fruit.mar"), "--quiet"])
    assert result.exit_code == 1, result.output
    rows = read_csv(out)
    expected, _ = find_images(messy_folder)
    assert [r["path"] for r in rows] == expected
    assert list(rows[0]) == list(COLUMNS)
    by_path = {r["path"]: r for r in rows}
    for path, code in BAD_FILES.items():
        assert by_path[path]["status"] == "error" and by_path[path]["error"] and by_path[path]["error_code"] == code
    good = [r for r in rows if r["path"] not in BAD_FILES]
    assert all(r["status"] == "ok" and r["label"] and r["model_version"] for r in good)
    assert all(len(json.loads(r["top_k"])) == 5 for r in good)
    assert by_path["Lime/0000.jpg"]["true_label"] == "Lime"  # folders name classes: labels detected
    assert "accuracy" in result.stderr


def test_accuracy_matches_fruit_train_evaluate(demo_data: Path, trained_run: Path, model_store: Path, tmp_path: Path):
    assert train_main(["evaluate", str(trained_run), str(demo_data / "Test"), "--out", str(tmp_path / "eval"),
                       "--no-progress"]) == 0
    evaluated = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    result = CliRunner().invoke(batch_main, ["score", str(demo_data / "Test"), str(tmp_path / "out.csv"), "--local",
                                             "--model", str(model_store / "fruit.mar"), "--quiet"])
    assert result.exit_code == 0, result.output
    assert f"accuracy {evaluated['top1']:.4f}, macro-F1 {evaluated['macro_f1']:.4f}" in result.stderr


def test_resume_keeps_rows_and_drops_a_torn_line(demo_data: Path, model_store: Path, tmp_path: Path):
    out = tmp_path / "out.csv"
    args = ["score", str(demo_data / "Test"), str(out), "--local", "--model", str(model_store / "fruit.mar"), "--quiet"]
    assert CliRunner().invoke(batch_main, args).exit_code == 0
    full = read_csv(out)
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:20]) + lines[20][:15])  # as if killed mid-write
    assert len(read_rows(out)) == 19
    result = CliRunner().invoke(batch_main, [*args, "--resume"])
    assert result.exit_code == 0 and f"{len(full) - 19} scored this run" in result.stderr
    assert same_scores(read_csv(out), full)


def same_scores(rows: list[dict], expected: list[dict], atol: float = 1e-5) -> bool:
    """Equal rows, except that probabilities may differ in the last printed digit: a resumed run scores the
    remaining images in other batch compositions, and oneDNN's kernels round differently by batch size."""
    if len(rows) != len(expected):
        return False
    for row, want in zip(rows, expected, strict=True):
        exact = [c for c in row if c not in ("confidence", "top_k")]
        if [row[c] for c in exact] != [want[c] for c in exact] or row.keys() != want.keys():
            return False
        if row["confidence"] and abs(float(row["confidence"]) - float(want["confidence"])) > atol:
            return False
        if row["top_k"]:
            got, exp = json.loads(row["top_k"]), json.loads(want["top_k"])
            if [g["label"] for g in got] != [e["label"] for e in exp] or any(
                    abs(g["probability"] - e["probability"]) > atol for g, e in zip(got, exp, strict=True)):
                return False
    return True


def test_help_documents_exit_codes_and_columns():
    result = CliRunner().invoke(batch_main, ["score", "--help"])
    assert result.exit_code == 0
    for text in ("0  every file scored", "3  server unreachable", "true_label", "--resume", "--local"):
        assert text in result.output


def test_usage_errors_exit_2(messy_folder: Path, tmp_path: Path):
    result = CliRunner().invoke(batch_main, ["score", str(messy_folder), str(tmp_path / "o.csv"), "--local",
                                             "--model", str(tmp_path / "missing.mar")])
    assert result.exit_code == 2 and "no model archive" in result.stderr
    result = CliRunner().invoke(batch_main, ["score", str(tmp_path / "nope"), str(tmp_path / "o.csv")])
    assert result.exit_code == 2


def test_labels_from_another_run_exit_2(messy_folder: Path, trained_run: Path, tmp_path: Path):
    run = shutil.copytree(trained_run, tmp_path / "run")
    (run / "index_to_name.json").write_text(json.dumps({"0": "Apple", "1": "Pear"}))  # the model has 7 classes
    out = tmp_path / "o.csv"
    result = CliRunner().invoke(batch_main, ["score", str(messy_folder), str(out), "--local", "--model", str(run)])
    assert result.exit_code == 2 and "names 2 classes" in result.stderr and "Traceback" not in result.output
    assert not out.exists()


def test_unreachable_server_exits_3(messy_folder: Path, tmp_path: Path):
    result = CliRunner().invoke(batch_main, ["score", str(messy_folder), str(tmp_path / "o.csv"),
                                             "--url", "http://127.0.0.1:9", "--quiet"])
    assert result.exit_code == 3 and "cannot reach" in result.stderr


# ---- against a real torchserve ----

@pytest.fixture(scope="module")
def server(model_store: Path, tmp_path_factory: pytest.TempPathFactory):
    with TorchServe(workdir=tmp_path_factory.mktemp("ts_batch"), model_store=model_store) as ts:
        yield ts


def server_args(ts: TorchServe) -> list[str]:
    return ["--url", ts.inference_url, "--key-file", str(ts.workdir / "key_file.json")]


@pytest.mark.server
def test_server_scoring_equals_local(server: TorchServe, messy_folder: Path, model_store: Path, tmp_path: Path):
    served = CliRunner().invoke(batch_main, ["score", str(messy_folder), str(tmp_path / "server.csv"), "--quiet",
                                             "--concurrency", "8", *server_args(server)])
    local = CliRunner().invoke(batch_main, ["score", str(messy_folder), str(tmp_path / "local.csv"), "--quiet",
                                            "--local", "--model", str(model_store / "fruit.mar")])
    assert served.exit_code == local.exit_code == 1, served.output + local.output
    server_rows, local_rows = read_csv(tmp_path / "server.csv"), read_csv(tmp_path / "local.csv")
    assert [r["path"] for r in server_rows] == [r["path"] for r in local_rows]
    for s, loc in zip(server_rows, local_rows, strict=True):
        assert (s["status"], s["label"], s["error_code"], s["true_label"]) == \
            (loc["status"], loc["label"], loc["error_code"], loc["true_label"]), s["path"]
        if s["status"] == "ok":
            assert abs(float(s["confidence"]) - float(loc["confidence"])) <= 1e-4
            assert s["uncertain"] == loc["uncertain"]
            assert float(s["ood_score"]) == pytest.approx(float(loc["ood_score"]), rel=1e-3, abs=1e-3)
            for a, b in zip(json.loads(s["top_k"]), json.loads(loc["top_k"]), strict=True):
                assert a["label"] == b["label"] and abs(a["probability"] - b["probability"]) <= 1e-4


@pytest.mark.server
def test_server_mode_can_only_flag_more(server: TorchServe, messy_folder: Path, tmp_path: Path):
    result = CliRunner().invoke(batch_main, ["score", str(messy_folder), str(tmp_path / "strict.csv"), "--quiet",
                                             "--max-distance", "0", *server_args(server)])
    assert result.exit_code == 1, result.output
    ok = [r for r in read_csv(tmp_path / "strict.csv") if r["status"] == "ok"]
    assert ok and all(r["uncertain"] == "true" for r in ok)


def _many_images(root: Path, count: int) -> Path:
    for i in range(count):
        folder = root / f"part{i // 100}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:05d}.jpg").write_bytes(jpeg_bytes(["Banana", "Lime", "Kiwi"][i % 3], seed=i))
    return root


@pytest.mark.server
def test_killed_client_then_resume_scores_each_file_once(server: TorchServe, tmp_path: Path):
    images = _many_images(tmp_path / "many", 400)
    out = tmp_path / "out.csv"
    args = [str(images), str(out), "--quiet", "--concurrency", "2", *server_args(server)]
    process = start_fruit_batch(*args)
    try:
        wait_for_rows(out, 20, process)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        process.kill()
    partial = read_rows(out)
    assert 20 <= len(partial) < 400
    resumed = start_fruit_batch(*args, "--resume")
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    rows = read_csv(out)
    assert [r["path"] for r in rows] == find_images(images)[0]
    assert all(r["status"] == "ok" for r in rows)


@pytest.mark.server
def test_server_stopped_mid_run_exits_3_then_resume_completes(model_store: Path, tmp_path: Path):
    images = _many_images(tmp_path / "many", 400)
    out = tmp_path / "out.csv"
    with TorchServe(workdir=tmp_path / "ts1", model_store=model_store) as first:
        process = start_fruit_batch(str(images), str(out), "--quiet", "--concurrency", "2", "--retries", "2",
                               *server_args(first))
        try:
            wait_for_rows(out, 20, process)
            first.stop()
            _, err = process.communicate(timeout=120)
        finally:
            process.kill()
    assert process.returncode == 3, err
    assert "rerun with --resume" in err and "Traceback" not in err
    done = read_rows(out)
    assert 20 <= len(done) < 400 and all(r["status"] == "ok" for r in done.values())
    with TorchServe(workdir=tmp_path / "ts2", model_store=model_store) as second:
        result = CliRunner().invoke(batch_main, ["score", str(images), str(out), "--quiet", "--resume",
                                                 *server_args(second)])
    assert result.exit_code == 0, result.output
    rows = read_csv(out)
    assert [r["path"] for r in rows] == find_images(images)[0]
    assert all(r["status"] == "ok" for r in rows)


def test_a_second_run_on_the_same_csv_is_refused_naming_the_first(model_store: Path, tmp_path: Path):
    images = _many_images(tmp_path / "many", 300)
    out = tmp_path / "out.csv"
    first = start_fruit_batch(str(images), str(out), "--quiet", "--local", "--model", str(model_store / "fruit.mar"),
                              "--batch-size", "4")
    try:
        wait_for_rows(out, 8, first)
        first.send_signal(signal.SIGSTOP)  # frozen mid-run, holding the lock: the second run starts meanwhile
        second = CliRunner().invoke(batch_main, ["score", str(images), str(out), "--quiet", "--local", "--model",
                                                 str(model_store / "fruit.mar")])
        assert second.exit_code == 2, second.output
        assert f"pid {first.pid}" in second.stderr and "being written by" in second.stderr
        first.send_signal(signal.SIGCONT)
        _, err = first.communicate(timeout=300)
    finally:
        first.kill()
    assert first.returncode == 0, err
    assert [r["path"] for r in read_csv(out)] == find_images(images)[0]  # whole: the refused run wrote nothing
    assert not (tmp_path / ".out.csv.lock").exists()
    again = CliRunner().invoke(batch_main, ["score", str(images), str(out), "--quiet", "--resume", "--local",
                                            "--model", str(model_store / "fruit.mar")])
    assert again.exit_code == 0, again.output  # the lock went with the first run


def test_ctrl_c_during_local_scoring_keeps_whole_rows(model_store: Path, tmp_path: Path):
    """Ctrl-C lands while a batch is in the forward pass: the run ends with 130 and every row in OUT is whole."""
    images = _many_images(tmp_path / "many", 600)
    out = tmp_path / "out.csv"
    process = start_fruit_batch(str(images), str(out), "--quiet", "--local", "--model",
                                str(model_store / "fruit.mar"), "--batch-size", "2")
    try:
        wait_for_rows(out, 8, process)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 130, err
    assert "Rerun with --resume" in err and "Traceback" not in err
    rows = read_csv(out)
    assert 8 <= len(rows) < 600 and all(r["status"] == "ok" and r["label"] for r in rows)
