"""Shared fixtures: a synthetic dataset, one tiny trained run and its .mar, built once per session."""

from __future__ import annotations

import contextlib
import csv
import io
import os
import random
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from fruitserve.model_store.archive import build_archive
from fruitserve.train.ood import background, lighting
from fruitserve.train.synthetic import CLASSES, draw_image, make_demo_data
from fruitserve.train.train import main as train_main
from PIL import Image

from bench.report import DEFAULT_IMAGES

ROOT = Path(__file__).resolve().parents[1]
CACHES = {".venv", ".git", "__pycache__", ".pytest_cache", ".ruff_cache", "fruitserve.egg-info"}


def work_tree() -> set[str]:
    """Every path in the work tree but caches; inside a run folder that already existed, only the folder (a
    training may be writing there while the tests run)."""
    found = set()
    runs = ROOT / "runs"
    existing_runs = {p.name for p in runs.iterdir()} if runs.is_dir() else set()
    for dirpath, dirnames, filenames in os.walk(ROOT):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if d not in CACHES]
        if here.parent == runs and here.name in existing_runs:
            dirnames[:] = []
            continue
        found.update(str((here / n).relative_to(ROOT)) for n in (*dirnames, *filenames))
    return found


@pytest.fixture(scope="session", autouse=True)
def work_tree_stays_clean() -> Iterator[None]:
    """A test run leaves nothing behind in the work tree (a run once created an empty runs/<timestamp>/)."""
    before = work_tree()
    yield
    left = sorted(work_tree() - before)
    assert not left, f"the tests left these in the work tree: {left[:20]}"


# tests/test_tracking.py turns tracking on where it is what the test is about
TINY_TRAIN_ARGS = ["--input-size", "48", "--epochs", "6", "--batch-size", "32", "--lr", "3e-3", "--seed", "0",
                   "--no-progress", "--patience", "6", "--no-tracking", "--no-int8"]


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_demo_data(tmp_path_factory.mktemp("demo"), train_per_class=30, test_per_class=8, seed=0)


@pytest.fixture(scope="session")
def trained_run(demo_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    # as a user trains: with model.int8.onnx (where ONNX Runtime is installed), so the servers the tests start
    # serve what `auto` serves on this CPU; the other trainings of the suite skip it (--no-int8) for time
    assert train_main(["train", "--data", str(demo_data), "--output-dir", str(out), "--run-name", "tiny",
                       *[a for a in TINY_TRAIN_ARGS if a != "--no-int8"]]) == 0
    return out / "tiny"


def build_store(trained_run: Path, tmp_path_factory: pytest.TempPathFactory, name: str, batch_size: int,
                max_batch_delay_ms: int, top_k: int | None = None) -> Path:
    """A model store whose fruit.mar has its own batching (e.g. a long delay so concurrent requests share a batch)."""
    store = tmp_path_factory.mktemp(f"store_{name}")
    config = store.parent / f"{name}-config.yaml"
    handler = f"handler:\n  top_k: {top_k}\n" if top_k else ""
    config.write_text(f"minWorkers: 1\nmaxWorkers: 1\nbatchSize: {batch_size}\nmaxBatchDelay: {max_batch_delay_ms}\n"
                      f"responseTimeout: 60\n{handler}")
    build_archive(trained_run, store, config_file=config)
    return store


@pytest.fixture(scope="session")
def model_store(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    store = tmp_path_factory.mktemp("model_store")
    build_archive(trained_run, store)
    return store


def jpeg_bytes(class_name: str = "Banana", seed: int = 0, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    draw_image(class_name, random.Random(seed)).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def image_bytes(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


# A child started from a background job of a non-interactive shell (CI scripts, `(make test &)`) inherits SIGINT
# "ignored", and Python then installs no KeyboardInterrupt handler. fruit-batch respects that, as programs should
# (its launcher asked it not to react to the terminal's Ctrl-C); the tests start it as a terminal would.
AS_FROM_A_TERMINAL = "import signal; signal.signal(signal.SIGINT, signal.default_int_handler); "


def start_fruit_batch(*args: str) -> subprocess.Popen:
    """``fruit-batch score ARGS`` in its own process, so that it can be interrupted, killed or see its server stop."""
    return subprocess.Popen([sys.executable, "-c", AS_FROM_A_TERMINAL + "from fruitserve.batch.cli import main; main()",
                             "score", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_until(ready: Callable[[], bool], what: str, *, timeout: float, interval: float = 0.2,
               process: subprocess.Popen | None = None, log: Path | None = None) -> None:
    """Poll ``ready()`` until it is true; fail with ``what`` after ``timeout`` s, or at once if ``process`` ends
    first (with the tail of its ``log``). The one wait behind every server a test starts."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log is not None and log.is_file() else ""
            raise AssertionError(f"{what}: the process exited with {process.returncode}\n{tail}")
        if ready():
            return
        time.sleep(interval)
    raise AssertionError(f"{what}: not after {timeout:.0f} s")


def http_ok(url: str) -> bool:
    """GET ``url`` answers 200 (a server still starting refuses the connection)."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (OSError, urllib.error.URLError):
        return False


def wait_for_rows(out: Path, count: int, process: subprocess.Popen, timeout: float = 120) -> None:
    """Until OUT.csv holds more than ``count`` rows, while the fruit-batch ``process`` still runs."""
    wait_until(lambda: out.exists() and out.read_text().count("\n") > count,
               f"fruit-batch writing more than {count} rows before it is interrupted", timeout=timeout,
               interval=0.05, process=process)


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


@contextlib.contextmanager
def local_http_server(handler: type[BaseHTTPRequestHandler], tls: ssl.SSLContext | None = None) -> Iterator[str]:
    """A scripted HTTP(S) server on a free loopback port, in a thread, for client-side tests; yields its URL."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True  # a handler told to hang does not hold up the test's end
    if tls is not None:
        httpd.socket = tls.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"{'https' if tls else 'http'}://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


# --- real-looking images, for comparing precisions ---------------------------------------------------------


def real_fruit_photos(per_class: int = 1) -> list[bytes]:
    """Fruits-360 Test photos, the first ``per_class`` of each class (sorted): the same set on every run."""
    if not DEFAULT_IMAGES.is_dir():
        pytest.skip(f"no Fruits-360 Test split at {DEFAULT_IMAGES}")
    photos = []
    for folder in sorted(p for p in DEFAULT_IMAGES.iterdir() if p.is_dir()):
        photos += [f.read_bytes() for f in sorted(folder.glob("*.jpg"))[:per_class]]
    return photos


def drawn_fruit(per_class: int = 6) -> list[bytes]:
    """New drawings of the demo classes (a seed training never used) under other light and on textured
    backgrounds, saved as JPEG as a camera would."""
    rng, photos = random.Random(1234), []
    for class_name in CLASSES:
        for i in range(per_class):
            image = draw_image(class_name, rng)
            image = (lighting if i % 2 else background)(image, rng)
            buffer = io.BytesIO()
            image.save(buffer, "JPEG", quality=85)
            photos.append(buffer.getvalue())
    return photos


def assert_labels_agree(reference, other, *, max_difference: float, clear_margin: float, clear_in: int,
                        flips_in: int | None) -> None:
    """Class probabilities (N x C) of another precision against fp32's: no probability further than
    ``max_difference``; where fp32 is clear (its runner-up more than ``clear_margin`` behind), the same label; at
    least one image in ``clear_in`` clear, or the test says little; and, near ties included, at most one label in
    ``flips_in`` different (one in a smaller set), unless ``flips_in`` is None."""
    assert float((reference - other).abs().max()) <= max_difference
    top2 = reference.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > clear_margin
    assert clear.sum() >= len(reference) // clear_in, "too few clear cases: the test would say little"
    assert (reference.argmax(1)[clear] == other.argmax(1)[clear]).all()
    if flips_in is not None:
        assert (reference.argmax(1) != other.argmax(1)).sum() <= max(1, len(reference) // flips_in)
