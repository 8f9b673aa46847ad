"""``fruit-batch score s3://bucket/prefix`` against a real S3-compatible server (moto's, started as a process on a
free loopback port, with credentials enforced): every mode, keys with spaces and unicode, corrupt objects, and
the clear errors (no bucket, bad credentials, no server)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import http_ok, read_csv, wait_until
from fruitserve.batch.cli import main as batch_main
from fruitserve.model_store.torchserve_process import TorchServe, free_port

boto3 = pytest.importorskip("boto3", reason="the s3 extra is not installed")
pytest.importorskip("s3fs", reason="the s3 extra is not installed")
pytestmark = pytest.mark.s3

BUCKET = "fruit-images"
PREFIX = "shop/2026"
REGION = "us-east-1"
# the keys a real bucket holds: spaces, unicode, an emoji, a plus sign, nested prefixes
ODD_NAMES = ["Lime/with space.jpg", "Kiwi/kiwi – ünïcode.jpg", "Banana/🍌 banana.jpg", "Banana/a+b.jpg"]


class MotoServer:
    """moto's S3 (and IAM) server in its own process; after the first IAM calls, every request must be signed
    with a real key (INITIAL_NO_AUTH_ACTION_COUNT), as on AWS."""

    def __init__(self, root: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.root = root
        self.process: subprocess.Popen | None = None

    def start(self) -> MotoServer:
        moto = Path(sys.executable).parent / "moto_server"
        self._log = open(self.root / "moto.log", "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen([str(moto), "-H", "127.0.0.1", "-p", str(self.port)],
                                        env=os.environ | {"INITIAL_NO_AUTH_ACTION_COUNT": "4"},
                                        stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_until(lambda: http_ok(f"{self.url}/moto-api/"), "moto_server", timeout=60, process=self.process,
                       log=self.root / "moto.log")
        except AssertionError:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.process is not None:
            os.killpg(self.process.pid, signal.SIGINT)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
            self.process = None
            self._log.close()

    def credentials(self) -> dict[str, str]:
        """A user with S3 access: the four unauthenticated calls the server allows."""
        iam = boto3.client("iam", endpoint_url=self.url, region_name=REGION, aws_access_key_id="bootstrap",
                           aws_secret_access_key="bootstrap")
        iam.create_user(UserName="scorer")
        policy = iam.create_policy(PolicyName="s3-all", PolicyDocument=json.dumps({
            "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
        iam.attach_user_policy(UserName="scorer", PolicyArn=policy["Policy"]["Arn"])
        key = iam.create_access_key(UserName="scorer")["AccessKey"]
        return {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
                "AWS_ENDPOINT_URL": self.url, "AWS_DEFAULT_REGION": REGION}


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[MotoServer, dict[str, str]]]:
    server = MotoServer(tmp_path_factory.mktemp("moto")).start()
    try:
        yield server, server.credentials()
    finally:
        server.stop()


@pytest.fixture(scope="module")
def bucket(moto: tuple[MotoServer, dict[str, str]], demo_data: Path) -> dict[str, str]:
    """The demo Test images under a prefix, plus odd keys, a corrupt object, a text file, and a hidden key."""
    _, env = moto
    s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name=REGION,
                      aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
    s3.create_bucket(Bucket=BUCKET)
    for path in sorted((demo_data / "Test").rglob("*.png")) + sorted((demo_data / "Test").rglob("*.jpg")):
        s3.put_object(Bucket=BUCKET, Key=f"{PREFIX}/{path.relative_to(demo_data / 'Test').as_posix()}",
                      Body=path.read_bytes())
    any_image = next((demo_data / "Test" / "Lime").iterdir()).read_bytes()
    for name in ODD_NAMES:
        s3.put_object(Bucket=BUCKET, Key=f"{PREFIX}/{name}", Body=any_image)
    s3.put_object(Bucket=BUCKET, Key=f"{PREFIX}/Banana/corrupt.jpg", Body=b"\xff\xd8\xff\xe0" + b"\x00" * 200)
    s3.put_object(Bucket=BUCKET, Key=f"{PREFIX}/Kiwi/notes.txt", Body=b"not an image")
    s3.put_object(Bucket=BUCKET, Key=f"{PREFIX}/.hidden/x.jpg", Body=any_image)
    s3.put_object(Bucket=BUCKET, Key="elsewhere/outside.jpg", Body=any_image)
    return env


@pytest.fixture
def s3_env(bucket: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    for key, value in bucket.items():
        monkeypatch.setenv(key, value)
    return bucket


def score(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(batch_main, ["score", *args, "--quiet"])
    return result.exit_code, result.stderr


def local_copy(demo_data: Path, root: Path) -> Path:
    """The same images as a local folder (what the bucket's scores must equal)."""
    import shutil

    shutil.copytree(demo_data / "Test", root)
    any_image = next((demo_data / "Test" / "Lime").iterdir()).read_bytes()
    for name in ODD_NAMES:
        (root / name).write_bytes(any_image)
    (root / "Banana" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 200)
    (root / "Kiwi" / "notes.txt").write_bytes(b"not an image")
    return root


def test_local_mode_on_a_bucket_equals_the_same_folder(s3_env: dict, demo_data: Path, model_store: Path,
                                                        tmp_path: Path):
    model = str(model_store / "fruit.mar")
    code, err = score(f"s3://{BUCKET}/{PREFIX}", str(tmp_path / "s3.csv"), "--local", "--model", model)
    assert code == 1, err  # the corrupt object is its error row
    folder = local_copy(demo_data, tmp_path / "folder")
    score(str(folder), str(tmp_path / "folder.csv"), "--local", "--model", model)
    s3_rows, folder_rows = read_csv(tmp_path / "s3.csv"), read_csv(tmp_path / "folder.csv")
    assert [r["path"] for r in s3_rows] == [r["path"] for r in folder_rows]  # keys relative to the prefix
    assert all(name in {r["path"] for r in s3_rows} for name in ODD_NAMES)
    assert not any(".hidden" in r["path"] or "outside" in r["path"] for r in s3_rows)
    for a, b in zip(s3_rows, folder_rows, strict=True):
        assert (a["status"], a["label"], a["confidence"], a["error_code"]) == (
            b["status"], b["label"], b["confidence"], b["error_code"])
    assert {r["path"]: r["error_code"] for r in s3_rows if r["status"] == "error"} == {"Banana/corrupt.jpg": "400"}
    assert "1 non-image files passed over" in err and "accuracy" in err


def test_server_mode_reads_the_bucket(s3_env: dict, model_store: Path, tmp_path: Path):
    with TorchServe(workdir=tmp_path / "ts", model_store=model_store) as ts:
        code, err = score(f"s3://{BUCKET}/{PREFIX}/", str(tmp_path / "server.csv"), "--url", ts.inference_url,
                          "--key-file", str(ts.workdir / "key_file.json"))
    assert code == 1, err
    score(f"s3://{BUCKET}/{PREFIX}", str(tmp_path / "local.csv"), "--local", "--model", str(model_store / "fruit.mar"))
    served, local = read_csv(tmp_path / "server.csv"), read_csv(tmp_path / "local.csv")
    assert [(r["path"], r["status"], r["label"]) for r in served] == [(r["path"], r["status"], r["label"])
                                                                      for r in local]


@pytest.mark.ray
def test_ray_engine_reads_the_bucket(s3_env: dict, model_store: Path, tmp_path: Path):
    pytest.importorskip("ray", reason="the ray extra is not installed")
    code, err = score(f"s3://{BUCKET}/{PREFIX}", str(tmp_path / "ray.csv"), "--engine", "ray", "--model",
                      str(model_store / "fruit.mar"))
    assert code == 1, err
    score(f"s3://{BUCKET}/{PREFIX}", str(tmp_path / "local.csv"), "--local", "--model", str(model_store / "fruit.mar"))
    assert [(r["path"], r["label"], r["error_code"]) for r in read_csv(tmp_path / "ray.csv")] == [
        (r["path"], r["label"], r["error_code"]) for r in read_csv(tmp_path / "local.csv")]


def test_missing_bucket_is_a_usage_error(s3_env: dict, model_store: Path, tmp_path: Path):
    code, err = score("s3://no-such-bucket/x", str(tmp_path / "o.csv"), "--local", "--model",
                      str(model_store / "fruit.mar"))
    assert code == 2 and "no such bucket" in err


def test_bad_credentials_are_a_usage_error(s3_env: dict, model_store: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    code, err = score(f"s3://{BUCKET}/{PREFIX}", str(tmp_path / "o.csv"), "--local", "--model",
                      str(model_store / "fruit.mar"))
    assert code == 2 and "access denied" in err


def test_unreachable_endpoint_exits_3(s3_env: dict, model_store: Path, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    start = time.monotonic()
    code, err = score(f"s3://{BUCKET}/{PREFIX}", str(tmp_path / "o.csv"), "--local", "--model",
                      str(model_store / "fruit.mar"))
    assert code == 3 and "cannot be reached" in err
    assert time.monotonic() - start < 60  # bounded retries, not botocore's defaults
