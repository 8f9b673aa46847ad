"""Small helpers shared by training and evaluation (seeding, devices, provenance)."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from importlib import metadata as importlib_metadata
from pathlib import Path

import numpy as np
import torch
from fruitserve.handler.classifier import cpu_has_native_bf16
from tqdm import tqdm


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """The dtype training runs its forward pass in, or None for plain fp32.

    ``auto`` is fp16 AMP on CUDA and bf16 on a CPU with native bf16 instructions (BENCHMARKS.md, Training);
    elsewhere bf16 would be emulated and slower, so fp32.
    """
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.float16
    return torch.bfloat16 if cpu_has_native_bf16() else None


class LineProgress:
    """Progress for logs a machine reads (CI, ``make demo > log``): one line at every 10 %, no redrawn bar."""

    def __init__(self, total: int | None, desc: str, unit: str) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.count, self.next_tenth, self.start = 0, 1, time.perf_counter()

    def update(self, n: int = 1) -> None:
        self.count += n
        if not self.total:
            return
        tenth = self.count * 10 // self.total
        if tenth >= self.next_tenth:
            self.next_tenth = tenth + 1
            rate = self.count / max(time.perf_counter() - self.start, 1e-9)
            print(f"{self.desc}: {tenth * 10}% ({self.count}/{self.total} {self.unit}, {rate:.1f} {self.unit}/s)",
                  file=sys.stderr, flush=True)

    def set_postfix(self, **_: object) -> None:
        pass

    def close(self) -> None:
        pass


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", unit: str = "it",
             disable: bool = False) -> Iterable | tqdm | LineProgress:
    """A tqdm bar on a terminal; on a pipe or file, a line at every 10 % (``LineProgress``); nothing if disabled.

    With an ``iterable`` it returns an iterable that reports as it goes; without, an object with ``update``.
    """
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)
    if disable:
        return iterable if iterable is not None else LineProgress(None, desc, unit)
    if sys.stderr.isatty():
        return tqdm(iterable, total=total, desc=desc, unit=unit, leave=False, file=sys.stderr, dynamic_ncols=True)
    bar = LineProgress(total, desc, unit)
    if iterable is None:
        return bar
    return _counted(iterable, bar)


def _counted(iterable: Iterable, bar: LineProgress) -> Iterator:
    for item in iterable:
        yield item
        bar.update(1)


def package_versions(names: Iterable[str] = ("torch", "torchvision", "pillow", "numpy", "fruitserve")) -> dict:
    versions = {}
    for name in names:
        try:
            versions[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit(path: Path | None = None) -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=path or Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def dataset_fingerprint(files: Iterable[tuple[str, int]]) -> str:
    """sha256 over (relative path, size) pairs: cheap, and changes when files are added, removed or replaced."""
    digest = hashlib.sha256()
    for rel_path, size in sorted(files):
        digest.update(f"{rel_path}\0{size}\n".encode())
    return digest.hexdigest()


def write_json_atomic(path: Path, payload: object) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2, sort_keys=False)
        handle.write("\n")
    os.replace(tmp, path)


def save_atomic(obj: object, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)
