"""Batch-scoring benchmark on the full Fruits-360 Test split, all in one run:

    .venv/bin/python -m bench.batch_scoring --run runs/<run> [--precision bf16] [--ray]

1. the in-process ceiling (decode + preprocess + forward, same batch size, no CSV, no workers);
2. ``fruit-batch score --local``, compared with (1);
3. the server's capacity (load generator at concurrency 32, after a warm-up, before and after) and
   ``fruit-batch score`` against the same server, compared with it;
4. accuracy from each CSV, and ``fruit-train evaluate`` on the same folder.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from fruitserve.handler.classifier import int8_servable, resolve_precision
from fruitserve.model_store.archive import build_archive
from fruitserve.model_store.torchserve_process import TorchServe

from bench.loadgen import run_load
from bench.report import DEFAULT_IMAGES, save_results
from bench.serving import SHIPPED, in_process_ceiling, model_config

BIN = Path(sys.executable).parent


def timed(cmd: list[str]) -> tuple[float, str, float]:
    """Wall seconds, stderr, and peak RSS (MiB) of the child."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=7200)
    wall = time.perf_counter() - start
    if done.returncode not in (0, 1):
        raise RuntimeError(f"{cmd} failed ({done.returncode}): {done.stderr[-2000:]}")
    peak = max(before, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024
    return wall, done.stderr, peak


def _in_loop_rate(summary: str) -> float:
    """The rate fruit-batch reports for its scoring loop (without interpreter start and model load)."""
    match = re.search(r"\(([\d.]+) img/s\)", summary)
    return float(match.group(1)) if match else float("nan")


def csv_accuracy(path: Path) -> tuple[int, float]:
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    ok = [r for r in rows if r["status"] == "ok"]
    return len(rows), sum(r["label"] == r["true_label"] for r in ok) / max(1, len(ok))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    parser.add_argument("--precision", default="auto", help="for --local, the server's handler and the ceiling")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--skip-server", action="store_true", help="only the ceiling and local mode")
    parser.add_argument("--ray", action="store_true", help="also --engine ray on a local Ray, against --local")
    args = parser.parse_args()
    files = sorted(args.images.rglob("*.jpg"))
    precision = resolve_precision(args.precision, torch.device("cpu"), int8_servable(args.run))
    results: dict = {"images": len(files), "threads": torch.get_num_threads(), "precision": precision}

    payloads = [p.read_bytes() for p in files]
    # measured before and after --local, and averaged (one window on this shared VM swings by ±10 %)
    ceilings = [in_process_ceiling(args.run, payloads, args.batch_size, torch.get_num_threads(), precision)]
    print("ceiling (before)", round(ceilings[0], 1), flush=True)

    with tempfile.TemporaryDirectory(prefix="bench-batch-") as tmp:
        tmp_path = Path(tmp)
        store = tmp_path / "store"
        config = tmp_path / "model-config.yaml"
        config.write_text(model_config(SHIPPED["minWorkers"], SHIPPED["batchSize"], SHIPPED["maxBatchDelay"],
                                       torch.get_num_threads(), precision))
        build_archive(args.run, store, config_file=config)
        wall, err, peak = timed([str(BIN / "fruit-batch"), "score", str(args.images), str(tmp_path / "local.csv"),
                                 "--local", "--model", str(store / "fruit.mar"), "--precision", precision, "--batch-size",
                                 str(args.batch_size), "--quiet"])
        ceilings.append(in_process_ceiling(args.run, payloads, args.batch_size, torch.get_num_threads(), precision))
        print("ceiling (after)", round(ceilings[1], 1), flush=True)
        results["ceiling_runs_img_per_s"] = [round(c, 1) for c in ceilings]
        results["ceiling_img_per_s"] = round(sum(ceilings) / len(ceilings), 1)
        rows, accuracy = csv_accuracy(tmp_path / "local.csv")
        results["local"] = {"img_per_s": round(len(files) / wall, 1), "wall_s": round(wall, 1), "rows": rows,
                            "in_loop_img_per_s": _in_loop_rate(err),
                            "accuracy": accuracy, "peak_rss_mib": round(peak), "summary": err.strip().splitlines()[-1]}
        results["local_vs_ceiling"] = round(results["local"]["in_loop_img_per_s"] / results["ceiling_img_per_s"], 3)
        results["local_wall_vs_ceiling"] = round(results["local"]["img_per_s"] / results["ceiling_img_per_s"], 3)
        if args.ray:
            wall, err, _ = timed([str(BIN / "fruit-batch"), "score", str(args.images), str(tmp_path / "ray.csv"),
                                  "--engine", "ray", "--model", str(store / "fruit.mar"), "--precision", precision,
                                  "--batch-size", str(args.batch_size), "--quiet"])
            rows, accuracy = csv_accuracy(tmp_path / "ray.csv")
            # Ray's start (cluster, actors, model load in each) falls inside its scoring loop
            results["ray"] = {"img_per_s": round(len(files) / wall, 1), "wall_s": round(wall, 1), "rows": rows,
                              "in_loop_img_per_s": _in_loop_rate(err), "accuracy": accuracy,
                              "summary": err.strip().splitlines()[-1]}
            results["ray_vs_local_wall"] = round(results["ray"]["img_per_s"] / results["local"]["img_per_s"], 3)
            results["ray_vs_local_in_loop"] = round(results["ray"]["in_loop_img_per_s"]
                                                    / results["local"]["in_loop_img_per_s"], 3)
            startup = re.search(r"first rows came after ([\d.]+) s", err)
            if startup:  # the rate once Ray and its actors are up: what a longer run tends to
                seconds = len(files) / results["ray"]["in_loop_img_per_s"] - float(startup.group(1))
                results["ray"]["startup_s"] = float(startup.group(1))
                results["ray"]["steady_img_per_s"] = round(len(files) / seconds, 1)
                results["ray_steady_vs_local_in_loop"] = round(results["ray"]["steady_img_per_s"]
                                                               / results["local"]["in_loop_img_per_s"], 3)
            print("ray", json.dumps(results["ray"]), flush=True)
        print("local", json.dumps(results["local"]), flush=True)
        if args.skip_server:
            print(json.dumps(results, indent=2))
            return 0

        with TorchServe(workdir=tmp_path / "ts", model_store=store) as ts:
            headers = ts.headers() | {"Content-Type": "application/octet-stream"}
            sample = random.Random(0).sample(payloads, 3000)
            # warmed up first (the JVM compiles the frontend's hot paths), and measured before and after
            # fruit-batch: the reference is the mean of the two, as the ceiling in bench/serving.py
            run_load(ts.inference_url, "/predictions/fruit", sample, args.concurrency, 3000, headers)
            capacity = [run_load(ts.inference_url, "/predictions/fruit", sample, args.concurrency, 6000, headers)]
            print("capacity (before)", json.dumps(capacity[0].row()), flush=True)
            wall, err, _ = timed([str(BIN / "fruit-batch"), "score", str(args.images), str(tmp_path / "server.csv"),
                                  "--url", ts.inference_url, "--key-file", str(ts.workdir / "key_file.json"),
                                  "--concurrency", str(args.concurrency), "--quiet"])
            capacity.append(run_load(ts.inference_url, "/predictions/fruit", sample, args.concurrency, 6000, headers))
            print("capacity (after)", json.dumps(capacity[1].row()), flush=True)
        reference = sum(c.throughput for c in capacity) / len(capacity)
        results["server_capacity_runs"] = [c.row() for c in capacity]
        results["server_capacity_img_per_s"] = round(reference, 1)
        rows, accuracy = csv_accuracy(tmp_path / "server.csv")
        results["server"] = {"img_per_s": round(len(files) / wall, 1), "wall_s": round(wall, 1), "rows": rows,
                             "in_loop_img_per_s": _in_loop_rate(err),
                             "accuracy": accuracy, "summary": err.strip().splitlines()[-1]}
        results["server_vs_capacity"] = round(results["server"]["img_per_s"] / reference, 3)
        results["server_in_loop_vs_capacity"] = round(results["server"]["in_loop_img_per_s"] / reference, 3)
        print("server", json.dumps(results["server"]), flush=True)

        evaluate = subprocess.run([str(BIN / "fruit-train"), "evaluate", str(args.run), str(args.images), "--out",
                                   str(tmp_path / "eval"), "--precision", precision, "--no-progress"],
                                  capture_output=True, text=True, timeout=3600, check=True)
        metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
        results["evaluate"] = {"top1": metrics["top1"], "macro_f1": metrics["macro_f1"],
                               "summary": evaluate.stdout.strip().splitlines()[-1]}
    save_results("batch_scoring", results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
