"""Reliability figures for RELIABILITY.md: the bad-input corpus, load and overload, killed workers,
server restarts during ``fruit-batch``, and memory, against real torchserve processes on loopback.

    .venv/bin/python -m bench.reliability --run runs/<run> [--images ../shared/data/fruits-360/Test]

Every loop is bounded (a request count or a deadline). Results: bench/results/reliability.json.
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import requests
from fruitserve.batch.sources import LocalFolder
from fruitserve.model_store.archive import build_archive
from fruitserve.model_store.torchserve_process import TorchServe

from bench.corpus import cases, good_jpeg
from bench.loadgen import run_load
from bench.report import ROOT, save_results

TIMEOUT = 60
PATH = "/predictions/fruit"
FRUIT_BATCH = [sys.executable, "-c", "from fruitserve.batch.cli import main; main()"]


def worker_rss_mib(ts: TorchServe) -> float:
    return sum(psutil.Process(pid).memory_info().rss for pid in ts.worker_pids()) / 2**20


def fruit_batch(*args: str) -> subprocess.Popen:
    return subprocess.Popen([*FRUIT_BATCH, "score", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def server_args(ts: TorchServe) -> list[str]:
    return ["--url", ts.inference_url, "--key-file", str(ts.workdir / "key_file.json")]


def check_rows(out: Path, folder: Path) -> dict:
    """Every file exactly once, in walk order, and how many rows are errors."""
    with open(out, newline="") as handle:
        rows = list(csv.DictReader(handle))
    paths = [r["path"] for r in rows]
    expected = LocalFolder(folder).list()[0]
    return {"rows": len(rows), "files": len(expected), "duplicates": len(paths) - len(set(paths)),
            "missing": len(set(expected) - set(paths)), "errors": sum(r["status"] != "ok" for r in rows)}


def wait_rows(out: Path, count: int, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if out.exists() and out.read_text().count("\n") > count:
            return
        time.sleep(0.05)
    raise RuntimeError(f"fruit-batch did not write {count} rows (exit {process.poll()})")


# --- the corpus ---------------------------------------------------------------------------------------------

def corpus_section(ts: TorchServe, store: Path, workdir: Path, rounds: int) -> dict:
    corpus = cases()
    headers = ts.headers()
    pids = ts.worker_pids()

    def send(case) -> int:
        kwargs = {"files": case.files} if case.files else {"data": case.body}
        return requests.post(f"{ts.inference_url}{PATH}", headers=headers | case.headers, timeout=TIMEOUT,
                             **kwargs).status_code

    alone = Counter(send(c) == c.status for c in corpus for _ in range(rounds))
    good = [good_jpeg(seed=i) for i in range(len(corpus))]
    mixed_cases = [c for c in corpus if c.name != "body_over_max_request_size"]
    wrong = 0
    sent = 0
    for _ in range(rounds):
        jobs = [(c.status, c) for c in mixed_cases] + [(200, None)] * len(good)
        random.Random(sent).shuffle(jobs)
        with ThreadPoolExecutor(32) as pool:
            answers = list(pool.map(lambda job: send(job[1]) if job[1] else requests.post(
                f"{ts.inference_url}{PATH}", headers=headers, data=good[0], timeout=TIMEOUT).status_code, jobs))
        wrong += sum(a != expected for a, (expected, _) in zip(answers, jobs, strict=True))
        sent += len(jobs)
    restarted = ts.worker_pids() != pids

    folder = workdir / "corpus"
    folder.mkdir()
    for case in corpus:
        if case.file_name:
            (folder / case.file_name).write_bytes(case.body)
    for i in range(10):
        (folder / f"good_{i}.jpg").write_bytes(good_jpeg(seed=i))
    batch = {}
    for mode, args in {"server": server_args(ts), "local": ["--local", "--model", str(store / "fruit.mar")]}.items():
        out = workdir / f"corpus-{mode}.csv"
        done = fruit_batch(str(folder), str(out), "--quiet", *args)
        _, err = done.communicate(timeout=600)
        batch[mode] = {"exit": done.returncode, **check_rows(out, folder)}
    bad_files = sum(1 for c in corpus if c.file_name and c.bad)
    return {"kinds": len(corpus), "bad_kinds": sum(c.bad for c in corpus),
            "alone": {"requests": sum(alone.values()), "wrong_status": alone[False]},
            "mixed": {"requests": sent, "wrong_status": wrong}, "worker_restarted": restarted,
            "fruit_batch": batch, "bad_files": bad_files}


# --- load, overload ---------------------------------------------------------------------------------------

def load_section(ts: TorchServe, payloads: list[bytes], levels: list[int], requests_per_level: int) -> list[dict]:
    headers = ts.headers() | {"Content-Type": "application/octet-stream"}
    rows = []
    for c in levels:
        result = run_load(ts.inference_url, PATH, payloads, c, requests_per_level, headers)
        row = result.row() | {"statuses": {str(k): v for k, v in sorted(result.statuses.items())}}
        for status, latencies in result.latencies_by_status.items():
            ordered = sorted(latencies)
            row[f"p99_ms_{status}"] = round(ordered[int(0.99 * (len(ordered) - 1))], 1)
        rows.append(row)
        print("load", row, flush=True)
    return rows


# --- worker kills ------------------------------------------------------------------------------------------

def kill_under_load(ts: TorchServe, payloads: list[bytes], kills: int, clients: int = 8) -> list[dict]:
    """Clients post back to back; the worker is SIGKILLed; count what failed and how long until answers resume."""
    results = []
    for _ in range(kills):
        results.append(_kill_once(ts, payloads, clients))
        print("kill", results[-1], flush=True)
    return results


def _kill_once(ts: TorchServe, payloads: list[bytes], clients: int) -> dict:
    events: list[tuple[float, float, int | str]] = []
    lock = threading.Lock()
    stop = threading.Event()
    headers = ts.headers()

    def client(seed: int) -> None:
        rng = random.Random(seed)
        with requests.Session() as session:
            while not stop.is_set():
                start = time.monotonic()
                try:
                    status = session.post(f"{ts.inference_url}{PATH}", data=rng.choice(payloads), headers=headers,
                                          timeout=TIMEOUT).status_code
                except requests.RequestException as exc:
                    status = type(exc).__name__
                with lock:
                    events.append((start, time.monotonic(), status))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    time.sleep(3)
    old = ts.worker_pids()
    killed_at = time.monotonic()
    os.kill(old[0], signal.SIGKILL)
    ts.wait_for_new_worker(old)
    replaced = time.monotonic() - killed_at
    time.sleep(3)
    stop.set()
    for t in threads:
        t.join(TIMEOUT + 5)
    after = [e for e in events if e[1] >= killed_at]
    failed = Counter(str(s) for _, _, s in after if s != 200)
    first_ok = min((end for start, end, s in after if s == 200 and start >= killed_at), default=float("nan"))
    return {"requests_after_kill": len(after), "failed": sum(failed.values()), "failed_by_status": dict(failed),
            "new_worker_ready_s": round(replaced, 2), "answers_resumed_s": round(first_ok - killed_at, 2),
            "hung_clients": sum(t.is_alive() for t in threads)}


def fruit_batch_with_kills(ts: TorchServe, folder: Path, workdir: Path, runs: int) -> list[dict]:
    results = []
    for i in range(runs):
        out = workdir / f"kill-{i}.csv"
        process = fruit_batch(str(folder), str(out), "--quiet", "--concurrency", "4", "--retries", "8",
                              *server_args(ts))
        wait_rows(out, 100 + 200 * i, process)
        os.kill(ts.worker_pids()[0], signal.SIGKILL)
        _, err = process.communicate(timeout=1200)
        results.append({"exit": process.returncode, **check_rows(out, folder)})
        print("fruit-batch + kill", results[-1], flush=True)
    return results


def fruit_batch_with_restarts(store: Path, folder: Path, workdir: Path, runs: int) -> list[dict]:
    results = []
    for i in range(runs):
        out = workdir / f"restart-{i}.csv"
        with TorchServe(workdir=workdir / f"ts-restart-{i}a", model_store=store) as first:
            process = fruit_batch(str(folder), str(out), "--quiet", "--concurrency", "4", "--retries", "2",
                                  *server_args(first))
            wait_rows(out, 100 + 200 * i, process)
            first.stop()
            _, err = process.communicate(timeout=600)
        interrupted = {"exit": process.returncode, **check_rows(out, folder)}
        with TorchServe(workdir=workdir / f"ts-restart-{i}b", model_store=store) as second:
            resumed = fruit_batch(str(folder), str(out), "--quiet", "--resume", *server_args(second))
            resumed.communicate(timeout=1200)
        results.append({"first_exit": interrupted["exit"], "rows_before_resume": interrupted["rows"],
                        "resume_exit": resumed.returncode, **check_rows(out, folder)})
        print("restart + resume", results[-1], flush=True)
    return results


# --- memory ------------------------------------------------------------------------------------------------

def memory_soak(ts: TorchServe, payloads: list[bytes], total: int) -> dict:
    headers = ts.headers() | {"Content-Type": "application/octet-stream"}
    run_load(ts.inference_url, PATH, payloads, 8, 1000, headers)  # warm: allocator pools, first batches
    before = worker_rss_mib(ts)
    samples = []
    done = 0
    errors = 0
    chunk = total // 10
    while done < total:
        result = run_load(ts.inference_url, PATH, payloads, 8, chunk, headers)
        errors += sum(n for s, n in result.statuses.items() if s != 200)
        done += chunk
        samples.append(round(worker_rss_mib(ts), 1))
    return {"requests": done, "errors": errors, "rss_mib_after_warmup": round(before, 1), "rss_mib_every_10pct": samples,
            "growth_mib": round(samples[-1] - before, 1)}


def local_peak_rss(model: Path, folder: Path, workdir: Path) -> dict:
    """Peak RSS of ``fruit-batch --local`` over a whole folder: the kernel's figure for that one child (wait4)."""
    out = workdir / "local-peak.csv"
    start = time.perf_counter()
    process = subprocess.Popen([*FRUIT_BATCH, "score", str(folder), str(out), "--quiet", "--local", "--model",
                                str(model)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err = process.stderr.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    result = {"exit": process.returncode, "seconds": round(time.perf_counter() - start, 1),
              "peak_rss_mib": round(usage.ru_maxrss / 1024, 1), **check_rows(out, folder)}
    if process.returncode not in (0, 1):
        result["stderr"] = err[-1000:]
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="training run with model.pt")
    parser.add_argument("--images", type=Path, default=ROOT.parent / "shared/data/fruits-360/Test")
    parser.add_argument("--soak", type=int, default=10_000, help="requests for the memory soak")
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--batch-files", type=int, default=1000, help="files per fruit-batch fault run")
    parser.add_argument("--quick", action="store_true", help="smaller numbers, for trying the script out")
    args = parser.parse_args()
    # SIGTERM (timeout, kill) must still unwind the `with TorchServe` blocks, or servers outlive the script
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.quick:
        args.soak, args.kills, args.batch_files = 1000, 1, 300

    results: dict = {"machine": {"cpus": os.cpu_count()}, "args": {k: str(v) for k, v in vars(args).items()}}
    work = Path(tempfile.mkdtemp(prefix="fruit-reliability-"))
    try:
        store = work / "store"
        build_archive(args.run, store)
        files = sorted(args.images.rglob("*.jpg"))
        random.Random(0).shuffle(files)
        payloads = [p.read_bytes() for p in files[:2000]]
        subset = work / "subset"
        for p in files[:args.batch_files]:
            target = subset / p.relative_to(args.images)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(p, target)

        # First, while no other child has run, so ru_maxrss is this child's own peak.
        results["local_peak_rss"] = local_peak_rss(store / "fruit.mar", subset if args.quick else args.images, work)
        print("local peak", results["local_peak_rss"], flush=True)

        with TorchServe(workdir=work / "ts-main", model_store=store) as ts:
            results["corpus"] = corpus_section(ts, store, work, rounds=3 if not args.quick else 1)
            print("corpus", results["corpus"], flush=True)
            results["memory"] = memory_soak(ts, payloads, args.soak)
            print("memory", results["memory"], flush=True)
            results["load"] = load_section(ts, payloads, [1, 8, 32, 64], 1000 if args.quick else 2000)
        # a job queue of 8 (config.properties has 200) shows refusals at a concurrency the load generator can reach
        for queue, clients in ((200, 256), (8, 64)):
            with TorchServe(workdir=work / f"ts-queue-{queue}", model_store=store,
                            extra_config={"job_queue_size": str(queue)}) as ts:
                run_load(ts.inference_url, PATH, payloads[:64], 4, 64, ts.headers())
                results[f"overload_queue_{queue}"] = load_section(ts, payloads, [clients], 4 * clients if args.quick
                                                                  else 12 * clients)
        with TorchServe(workdir=work / "ts-kill", model_store=store) as ts:
            results["worker_kill_under_load"] = kill_under_load(ts, payloads, args.kills)
            results["fruit_batch_worker_kill"] = fruit_batch_with_kills(ts, subset, work, args.kills)
        results["fruit_batch_server_restart"] = fruit_batch_with_restarts(store, subset, work, max(1, args.kills - 1))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    save_results("reliability", results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
