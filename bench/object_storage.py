"""``fruit-batch`` on a bucket against the same images in a folder, and how long listing 100,000 keys takes.

    .venv/bin/python -m bench.object_storage --run runs/<run> [--images ../shared/data/fruits-360/Test]

An S3-compatible server (moto's, as a process on a free loopback port) holds the images under a prefix;
``fruit-batch score s3://... --local`` and ``fruit-batch score FOLDER --local`` run in alternating rounds. Then
100,000 tiny objects under another prefix in 100 "folders", listed page after page (``fs.find``) and the way
``fruit-batch`` lists (``RemoteFolder.list``: a thread per folder), timed.
Writes ``bench/results/object_storage.json``.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3
import requests
from fruitserve.batch.sources import RemoteFolder
from fruitserve.model_store.archive import build_archive
from fruitserve.model_store.torchserve_process import free_port

from bench.report import DEFAULT_IMAGES, save_results

FRUIT_BATCH = [sys.executable, "-c", "from fruitserve.batch.cli import main; main()", "score"]
ENV = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}


def start_moto(workdir: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    log = open(workdir / "moto.log", "wb")  # noqa: SIM115 - the process holds it
    process = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            if requests.get(f"{url}/moto-api/", timeout=2).status_code == 200:
                return process, url
        except requests.RequestException:
            time.sleep(0.1)
    raise RuntimeError("moto_server did not start")


def upload(s3, bucket: str, items: list[tuple[str, bytes]], threads: int = 16) -> float:
    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda item: s3.put_object(Bucket=bucket, Key=item[0], Body=item[1]), items))
    return time.perf_counter() - start


def score(source: str, out: Path, model: Path, env: dict) -> float:
    done = subprocess.run([*FRUIT_BATCH, source, str(out), "--local", "--model", str(model), "--quiet"],
                          env=os.environ | env, capture_output=True, text=True, timeout=7200)
    match = re.search(r"\(([\d.]+) img/s\)", done.stderr)
    if done.returncode not in (0, 1) or match is None:
        raise RuntimeError(f"fruit-batch failed ({done.returncode}): {done.stderr[-1000:]}")
    return float(match.group(1))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--keys", type=int, default=100_000, help="tiny objects to list (0: no listing test)")
    args = parser.parse_args()
    results: dict = {"run": str(args.run)}
    with tempfile.TemporaryDirectory(prefix="bench-s3-") as tmp:
        workdir = Path(tmp)
        process, url = start_moto(workdir)
        env = ENV | {"AWS_ENDPOINT_URL": url}
        os.environ.update(env)
        try:
            s3 = boto3.client("s3", endpoint_url=url, region_name="us-east-1")
            s3.create_bucket(Bucket="fruit")
            files = sorted(args.images.rglob("*.jpg"))
            seconds = upload(s3, "fruit", [(f"test/{f.relative_to(args.images).as_posix()}", f.read_bytes())
                                           for f in files])
            results["upload"] = {"objects": len(files), "seconds": round(seconds, 1)}
            store = workdir / "store"
            build_archive(args.run, store)
            rates: dict[str, list[float]] = {"folder": [], "s3": []}
            for round_ in range(args.rounds):  # alternating: the same machine weather for both
                rates["folder"].append(score(str(args.images), workdir / f"f{round_}.csv", store / "fruit.mar", env))
                rates["s3"].append(score("s3://fruit/test", workdir / f"s{round_}.csv", store / "fruit.mar", env))
                print(round_, {k: v[-1] for k, v in rates.items()}, flush=True)
            results["scoring_local_mode_img_per_s"] = rates
            results["s3_vs_folder"] = round(sum(rates["s3"]) / sum(rates["folder"]), 3)

            if args.keys:
                tiny = [(f"many/{i % 100:02d}/{i:06d}.jpg", b"x") for i in range(args.keys)]
                results["upload_tiny"] = {"objects": len(tiny), "seconds": round(upload(s3, "fruit", tiny, 32), 1)}
                folder = RemoteFolder("s3://fruit/many")
                fs, root = folder._fs_and_root
                start = time.perf_counter()
                sequential = fs.find(root, withdirs=False)  # one ListObjectsV2 page after the other
                results["list_sequential"] = {"keys": len(sequential), "seconds": round(time.perf_counter() - start, 1)}
                start = time.perf_counter()
                listed, _ = RemoteFolder("s3://fruit/many").list()  # what fruit-batch does: a thread per folder
                results["list"] = {"keys": len(listed), "seconds": round(time.perf_counter() - start, 1)}
                print("list", results["list_sequential"], results["list"], flush=True)
        finally:
            os.killpg(process.pid, signal.SIGINT)
            process.wait(timeout=30)
    save_results("object_storage", results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
