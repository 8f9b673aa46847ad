"""Small helpers shared by training and evaluation (seeding, devices, provenance)."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
from collections.abc import Iterable
from importlib import metadata as importlib_metadata
from pathlib import Path

import numpy as np
import torch


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but CUDA is not available on this machine")
    return torch.device(name)


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """The dtype training runs its forward pass in, or None for plain fp32.

    ``auto`` is fp16 AMP on CUDA and bf16 on a CPU with native bf16 instructions (about 1.3-1.4x faster
    on the AVX-512 BF16 machine of BENCHMARKS.md); elsewhere bf16 would be emulated and slower, so fp32.
    """
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.float16
    return torch.bfloat16 if cpu_has_native_bf16() else None


def cpu_has_native_bf16() -> bool:
    """oneDNN runs bf16 on any AVX-512 CPU, but only AVX-512 BF16 or AMX do it in hardware."""
    if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").split()
    except OSError:  # not Linux: trust oneDNN
        return True
    return "avx512_bf16" in flags or "amx_bf16" in flags


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
