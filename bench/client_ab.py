"""A/B of ``fruit-batch`` server-mode variants against one server, in alternating rounds.

    .venv/bin/python -m bench.client_ab --run runs/<run> \\
        --variant "shipped=" --variant "c64=--concurrency 64" --variant "nothreads=env:OMP_NUM_THREADS=1"

A variant is ``NAME=ARGS`` (extra ``fruit-batch score`` arguments) or ``NAME=env:KEY=VALUE[,KEY=VALUE]`` (extra
environment). One torchserve with the shipped configuration, warmed up; then every round runs each variant once,
in turn, on the same images, so that every variant sees the same machine weather; the rate is the one
``fruit-batch`` reports for its scoring loop. Writes ``bench/results/client_ab.json``.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from fruitserve.model_store.archive import build_archive
from fruitserve.model_store.torchserve_process import TorchServe

from bench.loadgen import run_load
from bench.report import DEFAULT_IMAGES, save_results

FRUIT_BATCH = [sys.executable, "-c", "from fruitserve.batch.cli import main; main()", "score"]


def parse_variant(text: str) -> tuple[str, list[str], dict[str, str]]:
    name, _, spec = text.partition("=")
    if spec.startswith("env:"):
        return name, [], dict(item.split("=", 1) for item in spec[4:].split(","))
    return name, shlex.split(spec), {}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    parser.add_argument("--count", type=int, default=6000, help="images per round (a sample of --images)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--variant", action="append", required=True, help="NAME=ARGS or NAME=env:KEY=VALUE")
    args = parser.parse_args()
    variants = [parse_variant(v) for v in args.variant]

    with tempfile.TemporaryDirectory(prefix="bench-client-ab-") as tmp:
        folder = Path(tmp) / "images"
        files = sorted(args.images.rglob("*.jpg"))
        for i, path in enumerate(random.Random(0).sample(files, min(args.count, len(files)))):
            target = folder / path.parent.name / f"{i:05d}.jpg"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
        store = Path(tmp) / "store"
        build_archive(args.run, store)
        rates: dict[str, list[float]] = {name: [] for name, _, _ in variants}
        with TorchServe(workdir=Path(tmp) / "ts", model_store=store) as ts:
            payloads = [p.read_bytes() for p in sorted(folder.rglob("*.jpg"))[:2000]]
            run_load(ts.inference_url, "/predictions/fruit", payloads, args.concurrency, 3000,
                     ts.headers() | {"Content-Type": "application/octet-stream"})  # warm-up (the JVM compiles)
            common = ["--url", ts.inference_url, "--key-file", str(ts.workdir / "key_file.json"), "--quiet",
                      "--concurrency", str(args.concurrency)]
            for round_ in range(args.rounds):
                for name, extra, env in variants:
                    out = Path(tmp) / f"{name}-{round_}.csv"
                    done = subprocess.run([*FRUIT_BATCH, str(folder), str(out), *common, *extra],
                                          env=os.environ | env, capture_output=True, text=True, timeout=3600)
                    match = re.search(r"\(([\d.]+) img/s\)", done.stderr)
                    if done.returncode != 0 or match is None:
                        raise RuntimeError(f"{name}: fruit-batch failed ({done.returncode}): {done.stderr[-1000:]}")
                    rates[name].append(float(match.group(1)))
                    print(name, round_, rates[name][-1], flush=True)
    base = statistics.median(rates[variants[0][0]])
    summary = {name: {"img_per_s_rounds": values, "median": statistics.median(values),
                      "vs_first": round(statistics.median(values) / base, 3)} for name, values in rates.items()}
    save_results("client_ab", {"run": str(args.run), "images": args.count, "rounds": args.rounds,
                               "concurrency": args.concurrency, "variants": args.variant, "results": summary})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
