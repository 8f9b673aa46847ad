"""What every benchmark records beside its figures: the machine it ran on, and where the JSON goes; one timer.

Machines differ between sessions (the same 2-core EPYC kind has come with and without AVX-512 BF16, and at
0.6-1x the speed of another day), so each result names its CPU model and the flags that decide its speed.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
DEFAULT_IMAGES = ROOT.parent / "shared" / "data" / "fruits-360" / "Test"
# the instruction-set flags that change which kernels oneDNN picks
SPEED_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def machine() -> dict:
    """CPU model, cores and speed-relevant flags, torch's build and the date."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if not line.strip():
                break  # the first processor is enough
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
    except OSError:
        pass
    cpu = fields.get("model name") or platform.processor() or "unknown"
    if "cpu family" in fields:
        cpu += f" (family {fields['cpu family']}, model {fields.get('model', '?')})"
    flags = set(fields.get("flags", "").split())
    return {"cpu": cpu, "cores": os.cpu_count(), "flags": [f for f in SPEED_FLAGS if f in flags],
            "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "date": dt.date.today().isoformat()}


def median_ms(step: Callable[[object], object], inputs: Iterable) -> float:
    """The median time of ``step(x)`` over ``inputs``, in ms: one call per input, each timed on its own."""
    times = []
    for x in inputs:
        start = time.perf_counter()
        step(x)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def save_results(name: str, results: dict) -> Path:
    """Print the results and keep them as ``bench/results/<name>.json`` (the latest run of each script)."""
    results = {"machine": machine()} | results
    text = json.dumps(results, indent=2)
    print(text)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(text + "\n")
    return path
