"""Training throughput by input size and precision: forward + backward + AdamW step, augmentation included.

    .venv/bin/python bench/train_speed.py [--sizes 64 80 96 100] [--steps 15]

Random uint8 batches of 64 through the real ``TrainAugment`` and a 141-class resnet18 in
channels-last, 2 threads, as ``fruit-train`` runs on a CPU. fp32 and bf16 autocast are
measured side by side for each size. Writes ``bench/results/train_speed.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torchvision
from fruitserve.train.presets import TrainAugment
from fruitserve.train.utils import cpu_has_native_bf16

ROOT = Path(__file__).resolve().parents[1]
BATCH = 64


def images_per_second(size: int, dtype: torch.dtype | None, steps: int) -> tuple[float, float]:
    """(img/s of whole training steps, share of step time spent in augmentation)."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=141).to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    augment = TrainAugment((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (BATCH, 3, size, size), dtype=torch.uint8)
    targets = torch.randint(0, 141, (BATCH,))

    def step() -> None:
        inputs = augment(images, generator).contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            loss = torch.nn.functional.cross_entropy(model(inputs), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(3):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    total = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        augment(images, generator)
    return BATCH * steps / total, (time.perf_counter() - start) / total


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 80, 96, 100])
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "native_bf16": cpu_has_native_bf16(),
               "threads": args.threads, "batch": BATCH, "rows": []}
    print("| input | fp32 img/s | bf16 img/s | bf16 / fp32 | augmentation share (fp32) |")
    print("|---|---|---|---|---|")
    for size in args.sizes:
        fp32, share = images_per_second(size, None, args.steps)
        bf16, _ = images_per_second(size, torch.bfloat16, args.steps)
        results["rows"].append({"input": size, "fp32_img_per_s": round(fp32, 1), "bf16_img_per_s": round(bf16, 1),
                                "augment_share_fp32": round(share, 3)})
        print(f"| {size} px | {fp32:.0f} | {bf16:.0f} | {bf16 / fp32:.2f} | {share:.0%} |", flush=True)
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "train_speed.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
