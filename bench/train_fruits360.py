"""Benchmark: train on Fruits-360 Training (every 4th image), report on the official Test split.

    .venv/bin/python -m bench.train_fruits360 [--data ../shared/data/fruits-360] [-- extra fruit-train args]

Writes bench/results/training.json and prints a Markdown table row for BENCHMARKS.md. Wall time includes decoding, every
epoch's validation, the export and the Test evaluation.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from bench.report import ROOT, save_results


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "fruits-360")
    parser.add_argument("--run-name", default=time.strftime("fruits360-%Y%m%d-%H%M%S"))
    parser.add_argument("extra", nargs="*", help="more fruit-train arguments, after --")
    args = parser.parse_args()
    if not (args.data / "Training").is_dir():
        print(f"no Fruits-360 data at {args.data}", file=sys.stderr)
        return 2
    cmd = [sys.executable, "-m", "fruitserve.train.train", "train", "--data", str(args.data),
           "--output-dir", str(ROOT / "runs"), "--run-name", args.run_name, "--no-progress", *args.extra]
    print("$", " ".join(cmd), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - start
    peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    run = ROOT / "runs" / args.run_name
    meta = json.loads((run / "metadata.json").read_text())
    test = meta["metrics"]["test"]
    history = [line.split(",") for line in (run / "history.csv").read_text().splitlines()]
    header, rows = history[0], history[1:]
    img_s = [float(r[header.index("train_img_per_s")]) for r in rows]
    result = {
        "run": str(run), "arch": meta["arch"], "input_size": meta["input_size"], "epochs_run": meta["epochs_run"],
        "best_epoch": meta["best_epoch"],
        "exported_epoch": meta.get("exported_epoch", meta["best_epoch"]), "train_images": meta["dataset"]["train_images"],
        "test_images": test["images"], "test_top1": test["top1"], "test_top5": test["top5"],
        "test_macro_f1": test["macro_f1"], "val_macro_f1": meta["metrics"]["validation"]["macro_f1"],
        "train_minutes": meta["train_seconds"] / 60, "wall_minutes": wall / 60,
        "train_img_per_s": sum(img_s) / len(img_s), "eval_img_per_s": test["eval_img_per_s"],
        "peak_rss_mib": peak_mib,
    }
    save_results("training", result)
    print("| arch | size | epochs (exported) | Test top-1 | Test macro-F1 | top-5 | train min | wall min | train img/s "
          "| eval img/s | peak RSS |")
    print(f"| {result['arch']} | {result['input_size']} | {result['epochs_run']} ({result['exported_epoch']}) "
          f"| {result['test_top1']:.4f} | {result['test_macro_f1']:.4f} | {result['test_top5']:.4f} "
          f"| {result['train_minutes']:.1f} | {result['wall_minutes']:.1f} | {result['train_img_per_s']:.0f} "
          f"| {result['eval_img_per_s']:.0f} | {peak_mib:.0f} MiB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
