"""Training throughput by input size and precision: fruit-train's own epoch (augmentation, forward, backward,
AdamW step) on random images.

    .venv/bin/python -m bench.train_speed [--sizes 64 80 96 100] [--images 1024]

Random uint8 images through ``train.train.train_one_epoch`` with the setup ``fruit-train`` makes (141-class
resnet18, channels-last, batch 64, 2 threads); fp32 and bf16 autocast side by side for each size. Writes
``bench/results/train_speed.json``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from fruitserve.handler.classifier import cpu_has_native_bf16
from fruitserve.train.data import DecodedImages
from fruitserve.train.train import get_args_parser, make_setup, train_one_epoch

from bench.report import save_results

CLASSES = 141


def images_per_second(size: int, precision: str, images: int) -> tuple[float, float]:
    """(img/s of a whole training epoch, share of it spent in augmentation)."""
    args = get_args_parser().parse_args(["train", "--data", ".", "--input-size", str(size), "--precision", precision,
                                         "--no-progress"])
    generator = torch.Generator().manual_seed(0)
    setup = make_setup(args, CLASSES, images, torch.device("cpu"), generator)
    data = DecodedImages(torch.randint(0, 256, (images, 3, size, size), dtype=torch.uint8, generator=generator),
                         torch.randint(0, CLASSES, (images,), generator=generator), [Path("x")] * images, [])
    warm = DecodedImages(data.images[:3 * args.batch_size], data.targets[:3 * args.batch_size], data.paths, [])
    train_one_epoch(setup, warm, 0, args)
    epoch = train_one_epoch(setup, data, 1, args)
    start = time.perf_counter()
    for i in range(0, images - args.batch_size + 1, args.batch_size):
        setup.augment(data.images[i:i + args.batch_size], generator)
    return epoch["train_img_per_s"], (time.perf_counter() - start) / epoch["epoch_seconds"]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 80, 96, 100])
    parser.add_argument("--images", type=int, default=1024, help="random images per epoch")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = {"native_bf16": cpu_has_native_bf16(), "threads": args.threads, "images": args.images, "rows": []}
    print("| input | fp32 img/s | bf16 img/s | bf16 / fp32 | augmentation share (fp32) |")
    print("|---|---|---|---|---|")
    for size in args.sizes:
        fp32, share = images_per_second(size, "fp32", args.images)
        bf16, _ = images_per_second(size, "bf16", args.images)
        results["rows"].append({"input": size, "fp32_img_per_s": round(fp32, 1), "bf16_img_per_s": round(bf16, 1),
                                "augment_share_fp32": round(share, 3)})
        print(f"| {size} px | {fp32:.0f} | {bf16:.0f} | {bf16 / fp32:.2f} | {share:.0%} |", flush=True)
    save_results("train_speed", results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
