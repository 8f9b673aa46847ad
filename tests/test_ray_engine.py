"""``fruit-batch --engine ray`` against real Ray clusters started by the tests on loopback (``ray start --head``,
token authentication on): rows equal to ``--local``, a killed actor, a head stopped mid-run, and the errors."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from click.testing import CliRunner
from conftest import jpeg_bytes, read_csv, start_fruit_batch, wait_for_rows, wait_until
from fruitserve.batch.cli import main as batch_main
from fruitserve.batch.sources import LocalFolder
from fruitserve.model_store.torchserve_process import free_port

pytest.importorskip("ray", reason="the ray extra is not installed")
pytestmark = pytest.mark.ray

TOKEN = secrets.token_hex(32)
# what a client of a token-protected cluster on loopback sets (README: "Ray")
CLIENT_ENV = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": TOKEN, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
              "RAY_USAGE_STATS_ENABLED": "0"}


class RayHead:
    """``ray start --head`` in its own process group, loopback only, token authentication on."""

    def __init__(self, cpus: int = 2) -> None:
        # short: Ray's unix socket paths live under it and must stay under 108 bytes
        self.temp_dir = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.cpus = cpus
        self.process: subprocess.Popen | None = None

    def start(self) -> RayHead:
        ray = Path(sys.executable).parent / "ray"
        self.process = subprocess.Popen(
            [str(ray), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={self.port}",
             "--include-dashboard=false", f"--num-cpus={self.cpus}", f"--temp-dir={self.temp_dir}", "--block"],
            env=os.environ | CLIENT_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)

        def has_cpus() -> bool:
            status = subprocess.run([str(ray), "status", f"--address={self.address}"], env=os.environ | CLIENT_ENV,
                                    capture_output=True, text=True, timeout=60)
            return status.returncode == 0 and "CPU" in status.stdout

        try:
            wait_until(has_cpus, "ray start --head", timeout=180, interval=1, process=self.process)
        except AssertionError:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)  # every daemon of this head shares its group
            self.process.wait(timeout=30)
            self.process = None
            for proc in psutil.process_iter(["cmdline"]):  # workers have groups of their own; the raylet's end
                try:                                        # takes them, but do not leave it to chance
                    if str(self.temp_dir) in " ".join(proc.info["cmdline"] or []):
                        proc.kill()
                except psutil.Error:
                    pass
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def actor_pids(self) -> list[int]:
        found = []
        for proc in psutil.process_iter(["cmdline", "name"]):
            try:
                if "RayWorker" in " ".join(proc.info["cmdline"] or []) or "RayWorker" in (proc.info["name"] or ""):
                    found.append(proc.pid)
            except psutil.Error:
                pass
        return found


@pytest.fixture(scope="module")
def ray_head() -> Iterator[RayHead]:
    head = RayHead().start()
    try:
        yield head
    finally:
        head.stop()


@pytest.fixture
def client_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in CLIENT_ENV.items():
        monkeypatch.setenv(key, value)


@pytest.fixture(scope="module")
def folder(demo_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ray_images")
    shutil.copytree(demo_data / "Test", root, dirs_exist_ok=True)
    (root / "Banana" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 300)
    (root / "Kiwi" / "text.png").write_bytes(b"not a picture")
    return root


def score(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(batch_main, ["score", *args, "--quiet"])
    return result.exit_code, result.stderr


def same_rows(a: Path, b: Path) -> None:
    rows_a, rows_b = read_csv(a), read_csv(b)
    assert [r["path"] for r in rows_a] == [r["path"] for r in rows_b]
    for x, y in zip(rows_a, rows_b, strict=True):
        assert (x["status"], x["label"], x["error_code"], x["true_label"], x["precision"]) == (
            y["status"], y["label"], y["error_code"], y["true_label"], y["precision"]), x["path"]
        if x["status"] == "ok":
            assert abs(float(x["confidence"]) - float(y["confidence"])) <= 1e-4
            for p, q in zip(json.loads(x["top_k"]), json.loads(y["top_k"]), strict=True):
                assert p["label"] == q["label"] and abs(p["probability"] - q["probability"]) <= 1e-4


def test_rows_on_a_ray_cluster_equal_local(ray_head: RayHead, client_env: None, folder: Path, model_store: Path,
                                           tmp_path: Path):
    model = str(model_store / "fruit.mar")
    local_code, _ = score(str(folder), str(tmp_path / "local.csv"), "--local", "--model", model)
    code, err = score(str(folder), str(tmp_path / "ray.csv"), "--engine", "ray", "--ray-address", ray_head.address,
                      "--model", model, "--batch-size", "8")
    assert code == local_code == 1, err  # the two bad files are their error rows
    same_rows(tmp_path / "ray.csv", tmp_path / "local.csv")
    rows = {r["path"]: r for r in read_csv(tmp_path / "ray.csv")}
    assert rows["Banana/corrupt.jpg"]["error_code"] == "400" and rows["Kiwi/text.png"]["error_code"] == "415"
    assert "accuracy" in err


def test_local_ray_without_an_address(folder: Path, model_store: Path, tmp_path: Path, monkeypatch):
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    code, err = score(str(folder), str(tmp_path / "ray.csv"), "--engine", "ray", "--model",
                      str(model_store / "fruit.mar"))
    assert code == 1, err
    score(str(folder), str(tmp_path / "local.csv"), "--local", "--model", str(model_store / "fruit.mar"))
    same_rows(tmp_path / "ray.csv", tmp_path / "local.csv")


def big_images(root: Path, count: int) -> Path:
    """Files that take real work to decode (1,600 px JPEGs): the run lasts long enough to be interrupted."""
    from conftest import image_bytes
    from PIL import Image

    payload = image_bytes(Image.open(__import__("io").BytesIO(jpeg_bytes("Lime", seed=1))).resize((1600, 1600)),
                          "JPEG", quality=90)
    for i in range(count):
        sub = root / ["Lime", "Banana"][i % 2]
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"{i:04d}.jpg").write_bytes(payload)
    return root


def test_an_actor_killed_mid_run_still_gives_every_row_once(ray_head: RayHead, client_env: None, model_store: Path,
                                                            tmp_path: Path):
    images = big_images(tmp_path / "big", 400)
    out = tmp_path / "out.csv"
    process = start_fruit_batch(str(images), str(out), "--quiet", "--engine", "ray", "--ray-address",
                                ray_head.address, "--model", str(model_store / "fruit.mar"), "--batch-size", "4")
    try:
        wait_for_rows(out, 4, process, timeout=300)
        pids = ray_head.actor_pids()
        assert pids, "no Ray actor found to kill"
        os.kill(pids[0], signal.SIGKILL)
        assert len(read_csv_lines(out)) < 400  # the kill landed mid-run
        _, err = process.communicate(timeout=600)
    finally:
        process.kill()
    assert process.returncode == 0, err
    paths = [r["path"] for r in read_csv(out)]
    assert paths == LocalFolder(images).list()[0]  # every file exactly once, in order
    assert all(r["status"] == "ok" for r in read_csv(out))


def read_csv_lines(path: Path) -> list[str]:
    return path.read_text().splitlines()[1:]


def test_head_stopped_mid_run_exits_3_then_resume_completes(client_env: None, model_store: Path, tmp_path: Path):
    images = big_images(tmp_path / "big", 300)
    out = tmp_path / "out.csv"
    args = [str(images), str(out), "--engine", "ray", "--model", str(model_store / "fruit.mar"), "--batch-size", "4"]
    first = RayHead().start()
    try:
        process = start_fruit_batch(*args, "--quiet", "--ray-address", first.address)
        try:
            wait_for_rows(out, 4, process, timeout=300)
            first.stop()
            _, err = process.communicate(timeout=300)
        finally:
            process.kill()
    finally:
        first.stop()
    assert process.returncode == 3, err
    assert "rerun with --resume" in err and "Traceback" not in err
    done = read_csv(out)
    assert 4 <= len(done) < 300 and all(r["status"] == "ok" for r in done)
    second = RayHead().start()
    try:
        code, err = score(*args, "--resume", "--ray-address", second.address)
    finally:
        second.stop()
    assert code == 0, err
    assert [r["path"] for r in read_csv(out)] == LocalFolder(images).list()[0]


def test_unreachable_cluster_exits_3(folder: Path, model_store: Path, tmp_path: Path, client_env: None):
    start = time.monotonic()
    code, err = score(str(folder), str(tmp_path / "o.csv"), "--engine", "ray", "--ray-address",
                      f"127.0.0.1:{free_port()}", "--model", str(model_store / "fruit.mar"))
    assert code == 3 and "cannot reach the Ray cluster" in err
    assert time.monotonic() - start < 60  # not Ray's minutes of retries


def test_a_client_without_the_token_is_refused(ray_head: RayHead, folder: Path, model_store: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "no-such-token"))
    code, err = score(str(folder), str(tmp_path / "o.csv"), "--engine", "ray", "--ray-address", ray_head.address,
                      "--model", str(model_store / "fruit.mar"))
    assert code in (2, 3) and "RAY_AUTH_TOKEN" in err
    assert read_csv(tmp_path / "o.csv") == []  # refused before any row
