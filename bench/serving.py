"""Serving benchmark: our handler vs the in-process ceiling vs TorchServe's stock image_classifier.

    .venv/bin/python bench/serving.py --run runs/<run> [--images ../shared/data/fruits-360/Test]

All three are measured in one run on the same machine, with the same TorchScript model,
batch size and threads. Prints JSON and Markdown rows for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fruitserve.handler.artifacts import load_for_inference, load_metadata  # noqa: E402
from fruitserve.handler.preprocessing import PreprocessConfig, load_uint8, normalize  # noqa: E402
from fruitserve.model_store.archive import _archiver, build_archive  # noqa: E402
from fruitserve.model_store.server import TorchServe  # noqa: E402
from loadgen import run_load  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# Defaults are what fruit.mar ships with, so the benchmark measures the shipped configuration.
SHIPPED = yaml.safe_load((ROOT / "model_store" / "model-config.yaml").read_text())
MODEL_CONFIG = """minWorkers: {workers}
maxWorkers: {workers}
batchSize: {batch}
maxBatchDelay: {delay}
responseTimeout: 60
handler:
  torch_threads: {threads}
"""


def save_results(name: str, results: dict) -> None:
    """Print the results and keep them as ``bench/results/<name>.json`` (the latest run of each script)."""
    print(json.dumps(results, indent=2))
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")


def sample_images(folder: Path, count: int, seed: int = 0) -> list[bytes]:
    files = sorted(folder.rglob("*.jpg"))
    random.Random(seed).shuffle(files)
    return [p.read_bytes() for p in files[:count]]


def in_process_ceiling(run: Path, payloads: list[bytes], batch: int, threads: int, size: int | None = None) -> float:
    """decode + preprocess + forward in one process, no server: the most a server could do."""
    torch.set_num_threads(threads)
    config = PreprocessConfig.from_metadata(load_metadata(run / "metadata.json"))
    if size:
        config = PreprocessConfig(size, config.mean, config.std)
    model = load_for_inference(run / "model.pt", torch.device("cpu"))
    with torch.inference_mode():
        model(torch.zeros(batch, 3, config.input_size, config.input_size))
        start = time.perf_counter()
        for i in range(0, len(payloads), batch):
            chunk = torch.stack([load_uint8(p, config) for p in payloads[i:i + batch]])
            model(normalize(chunk, config.mean, config.std))
    return len(payloads) / (time.perf_counter() - start)


def stock_archive(run: Path, store: Path, config: Path) -> None:
    import subprocess

    subprocess.run([_archiver(), "--model-name", "fruit", "--version", "stock", "--serialized-file",
                    str(run / "model.pt"), "--handler", "image_classifier", "--extra-files",
                    str(run / "index_to_name.json"), "--config-file", str(config), "--export-path", str(store),
                    "--force"], check=True, timeout=600)


def server_processes(ts: TorchServe) -> dict[str, list[psutil.Process]]:
    """The Java frontend and the Python model workers of ``ts`` (its launcher sleeps, so it is left out)."""
    children = psutil.Process(ts.process.pid).children(recursive=True)
    workers = set(ts.worker_pids())
    return {"frontend": [p for p in children if p.name() == "java"],
            "workers": [p for p in children if p.pid in workers]}


def cpu_seconds(processes: dict[str, list[psutil.Process]]) -> dict[str, float]:
    return {name: sum(sum(p.cpu_times()[:2]) for p in group) for name, group in processes.items()}


def measure_server(store: Path, workdir: Path, payloads: list[bytes], levels: list[int], requests_per_level: int,
                   label: str, extra_config: dict[str, str] | None = None) -> dict:
    start = time.perf_counter()
    with TorchServe(workdir=workdir, model_store=store, extra_config=extra_config or {}) as ts:
        cold_start = time.perf_counter() - start
        headers = ts.headers() | {"Content-Type": "application/octet-stream"}
        run_load(ts.inference_url, "/predictions/fruit", payloads[:64], 4, 64, headers)  # warm-up
        processes = server_processes(ts)
        rows = []
        for c in levels:
            before = cpu_seconds(processes)
            result = run_load(ts.inference_url, "/predictions/fruit", payloads, c, requests_per_level, headers)
            after = cpu_seconds(processes)
            # where the two cores went: CPU ms per request of each process group and of the client
            rows.append(result.row() | {f"{name}_cpu_ms_per_request": round((after[name] - before[name]) * 1000
                                                                            / requests_per_level, 3)
                                        for name in after} | {
                "client_cpu_ms_per_request": round(result.client_cpu_seconds * 1000 / requests_per_level, 3)})
            print(label, json.dumps(rows[-1]), flush=True)
        rss = sum(psutil.Process(pid).memory_info().rss for pid in ts.worker_pids()) / 2**20
    return {"label": label, "cold_start_s": round(cold_start, 2), "worker_rss_mib": round(rss), "levels": rows}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", type=Path, required=True, help="training run with model.pt")
    parser.add_argument("--images", type=Path, default=ROOT.parent / "shared/data/fruits-360/Test")
    parser.add_argument("--count", type=int, default=2000, help="distinct JPEGs to cycle through")
    parser.add_argument("--requests", type=int, default=2000, help="requests per concurrency level")
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--batch", type=int, default=SHIPPED["batchSize"])
    parser.add_argument("--delay", type=int, default=SHIPPED["maxBatchDelay"], help="maxBatchDelay in ms")
    parser.add_argument("--workers", type=int, default=SHIPPED["minWorkers"])
    parser.add_argument("--threads", type=int, default=2, help="torch threads per worker")
    parser.add_argument("--skip-stock", action="store_true")
    parser.add_argument("--ts-config", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config.properties setting for both servers (e.g. vmargs=...)")
    args = parser.parse_args()
    extra = dict(item.split("=", 1) for item in args.ts_config)

    payloads = sample_images(args.images, args.count)
    results: dict = {"machine": {"cpus": psutil.cpu_count(), "torch": torch.__version__}, "args": {
        k: str(v) for k, v in vars(args).items()}}
    # the ceiling gets the machine's cores, never more threads than cores (workers x threads may oversubscribe)
    ceiling_threads = min(args.threads * args.workers, psutil.cpu_count())
    # Measured before and after the server, and averaged: one 10 s window on a shared VM swings by ±20 %.
    ceilings = [in_process_ceiling(args.run, payloads, args.batch, ceiling_threads)]
    print("in-process ceiling (before)", round(ceilings[0], 1), flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        tmp_path = Path(tmp)
        config = tmp_path / "model-config.yaml"
        config.write_text(MODEL_CONFIG.format(workers=args.workers, batch=args.batch, delay=args.delay,
                                              threads=args.threads))
        ours = tmp_path / "ours"
        build_archive(args.run, ours, config_file=config)
        results["ours"] = measure_server(ours, tmp_path / "ts-ours", payloads, args.levels, args.requests, "ours",
                                       extra)
        ceilings.append(in_process_ceiling(args.run, payloads, args.batch, ceiling_threads))
        print("in-process ceiling (after)", round(ceilings[1], 1), flush=True)
        results["ceiling_runs_img_per_s"] = [round(c, 1) for c in ceilings]
        results["ceiling_img_per_s"] = round(sum(ceilings) / len(ceilings), 1)
        if not args.skip_stock:
            stock = tmp_path / "stock"
            stock.mkdir()
            stock_archive(args.run, stock, config)
            results["stock_ceiling_224px_img_per_s"] = round(
                in_process_ceiling(args.run, payloads[:512], args.batch, ceiling_threads, size=224), 1)
            results["stock"] = measure_server(stock, tmp_path / "ts-stock", payloads, args.levels,
                                              max(256, args.requests // 4), "stock", extra)
    save_results("serving", results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
