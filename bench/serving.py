"""Serving benchmark: our handler in each precision vs the in-process ceiling vs TorchServe's stock image_classifier.

    .venv/bin/python -m bench.serving --run runs/<run> [--images ../shared/data/fruits-360/Test]

All of it is measured in one run on the same machine, with the same TorchScript model, batch size and threads:
the in-process ceiling (decode + preprocess + forward through ``load_classifier``, no server) in each precision
(fp32; bf16 where the CPU has it; int8 where the run has ``model.int8.onnx``); the served img/s and latency at
each concurrency in each precision (archives that differ only in the handler's ``precision`` setting); and the
stock handler. Writes ``bench/results/serving.json``.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import tempfile
import time
from pathlib import Path

import psutil
import torch
import yaml
from fruitserve.handler.artifacts import INT8_MODEL_FILE
from fruitserve.handler.classifier import PRECISIONS, cpu_has_native_bf16, load_classifier
from fruitserve.handler.preprocessing import PreprocessConfig, load_uint8
from fruitserve.model_store.archive import archiver_command, build_archive
from fruitserve.model_store.torchserve_process import TorchServe

from bench.loadgen import run_load
from bench.report import DEFAULT_IMAGES, ROOT, save_results

# Defaults are what fruit.mar ships with, so the benchmark measures the shipped configuration.
SHIPPED = yaml.safe_load((ROOT / "model_store" / "model-config.yaml").read_text())


def model_config(workers: int, batch: int, delay: int, threads: int, precision: str) -> str:
    return (f"minWorkers: {workers}\nmaxWorkers: {workers}\nbatchSize: {batch}\nmaxBatchDelay: {delay}\n"
            f"responseTimeout: 60\nhandler:\n  torch_threads: {threads}\n  precision: {precision}\n")


def sample_images(folder: Path, count: int, seed: int = 0) -> list[bytes]:
    files = sorted(folder.rglob("*.jpg"))
    random.Random(seed).shuffle(files)
    return [p.read_bytes() for p in files[:count]]


def in_process_ceiling(run: Path, payloads: list[bytes], batch: int, threads: int, precision: str = "auto",
                       size: int | None = None) -> float:
    """decode + preprocess + forward in one process, no server: the most a server could do (img/s)."""
    torch.set_num_threads(threads)
    classifier = load_classifier(run, device="cpu", precision=precision, max_batch=batch)
    config = classifier.config
    if size:  # the stock handler's 224 px, for its own ceiling (a ResNet takes any input size)
        config = PreprocessConfig(size, config.mean, config.std)
    start = time.perf_counter()
    for i in range(0, len(payloads), batch):
        classifier.predict(torch.stack([load_uint8(p, config) for p in payloads[i:i + batch]]))
    return len(payloads) / (time.perf_counter() - start)


def stock_archive(run: Path, store: Path, config: Path) -> None:
    subprocess.run([*archiver_command(), "--model-name", "fruit", "--version", "stock", "--serialized-file",
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
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    parser.add_argument("--count", type=int, default=2000, help="distinct JPEGs to cycle through")
    parser.add_argument("--requests", type=int, default=2000, help="requests per concurrency level")
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--precisions", nargs="+", choices=[p for p in PRECISIONS if p != "auto"],
                        help="default: fp32, bf16 where the CPU has native bf16, int8 where the run has "
                             f"{INT8_MODEL_FILE}")
    parser.add_argument("--batch", type=int, default=SHIPPED["batchSize"])
    parser.add_argument("--delay", type=int, default=SHIPPED["maxBatchDelay"], help="maxBatchDelay in ms")
    parser.add_argument("--workers", type=int, default=SHIPPED["minWorkers"])
    parser.add_argument("--threads", type=int, default=2, help="torch threads per worker")
    parser.add_argument("--skip-stock", action="store_true")
    parser.add_argument("--ts-config", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config.properties setting for every server (e.g. vmargs=...)")
    args = parser.parse_args()
    extra = dict(item.split("=", 1) for item in args.ts_config)
    args.precisions = args.precisions or [
        "fp32", *(["bf16"] if cpu_has_native_bf16() else []), *(["int8"] if (args.run / INT8_MODEL_FILE).is_file() else [])]

    payloads = sample_images(args.images, args.count)
    results: dict = {"args": {k: str(v) for k, v in vars(args).items()}}
    # the ceiling gets the machine's cores, never more threads than cores (workers x threads may oversubscribe)
    ceiling_threads = min(args.threads * args.workers, psutil.cpu_count())
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        tmp_path = Path(tmp)
        for precision in args.precisions:
            # measured before and after the server, and averaged: one window on a shared VM swings by 10-20 %
            ceilings = [in_process_ceiling(args.run, payloads, args.batch, ceiling_threads, precision)]
            config = tmp_path / f"model-config-{precision}.yaml"
            config.write_text(model_config(args.workers, args.batch, args.delay, args.threads, precision))
            store = tmp_path / f"ours-{precision}"
            build_archive(args.run, store, config_file=config)
            served = measure_server(store, tmp_path / f"ts-{precision}", payloads, args.levels, args.requests,
                                    f"ours {precision}", extra)
            ceilings.append(in_process_ceiling(args.run, payloads, args.batch, ceiling_threads, precision))
            served["ceiling_runs_img_per_s"] = [round(c, 1) for c in ceilings]
            served["ceiling_img_per_s"] = round(sum(ceilings) / len(ceilings), 1)
            print(precision, "ceiling", served["ceiling_runs_img_per_s"], flush=True)
            results[f"ours_{precision}"] = served
        if not args.skip_stock:
            stock = tmp_path / "stock"
            stock.mkdir()
            config = tmp_path / "model-config-fp32.yaml"
            config.write_text(model_config(args.workers, args.batch, args.delay, args.threads, "fp32"))
            stock_archive(args.run, stock, config)
            results["stock_ceiling_224px_img_per_s"] = round(
                in_process_ceiling(args.run, payloads[:512], args.batch, ceiling_threads, "fp32", size=224), 1)
            results["stock"] = measure_server(stock, tmp_path / "ts-stock", payloads, args.levels,
                                              max(256, args.requests // 4), "stock", extra)
    results["summary"] = summarise(results, args.precisions)
    save_results("serving", results)
    return 0


def summarise(results: dict, precisions: list[str]) -> dict:
    """The figures BENCHMARKS.md's serving table quotes, side by side."""
    def at(label: str, concurrency: int, key: str = "img_per_s") -> float | None:
        rows = [r for r in results.get(label, {}).get("levels", []) if r["concurrency"] == concurrency]
        return rows[0][key] if rows else None

    summary: dict = {}
    for precision in precisions:
        ours = results[f"ours_{precision}"]
        summary[precision] = {"ceiling_img_per_s": ours["ceiling_img_per_s"],
                              "served_img_per_s": {c["concurrency"]: c["img_per_s"] for c in ours["levels"]},
                              "p50_ms_at_1": at(f"ours_{precision}", 1, "p50_ms"),
                              "cold_start_s": ours["cold_start_s"]}
        top = max(c["concurrency"] for c in ours["levels"])
        summary[precision]["served_vs_ceiling"] = round(at(f"ours_{precision}", top) / ours["ceiling_img_per_s"], 3)
        if "stock" in results and at("stock", top):
            summary[precision]["vs_stock"] = round(at(f"ours_{precision}", top) / at("stock", top), 2)
    for precision in [p for p in precisions if p != "fp32"] if "fp32" in precisions else []:
        top = max(c["concurrency"] for c in results[f"ours_{precision}"]["levels"])
        summary[f"{precision}_vs_fp32_served"] = round(at(f"ours_{precision}", top) / at("ours_fp32", top), 3)
        summary[f"{precision}_vs_fp32_ceiling"] = round(results[f"ours_{precision}"]["ceiling_img_per_s"]
                                                        / results["ours_fp32"]["ceiling_img_per_s"], 3)
    return summary


if __name__ == "__main__":
    raise SystemExit(main())
