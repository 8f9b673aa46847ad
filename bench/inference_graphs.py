"""Which graph serves the model fastest at the same answers: forward-pass speed and Test agreement, side by side.

    .venv/bin/python -m bench.inference_graphs --run runs/<run> [--images ../shared/data/fruits-360/Test]

Every variant gets the same decoded uint8 batches (decoding is not timed: it is the same for all) and is timed
from uint8 images to logits, normalisation included, at ``--batch`` images and ``--threads`` threads, in
alternating rounds (the median is reported), and on one image at a time (median ms: what a lone request waits).
Answers are compared with the fp32 TorchScript graph on every image of ``--images``: top-1 accuracy, macro-F1, the
share of images with the same top-1 label, and the largest softmax difference; for the served graphs, the share
the uncertainty rule answers. Variants: the graphs ``load_classifier`` serves in fp32, bf16 and int8 (the run's
``model.int8.onnx``, from ``fruit-train export --format int8``), ONNX Runtime fp32 of the plain model, and
``torch.compile`` of the eager model in bf16. Writes ``bench/results/inference_graphs.json``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from fruitserve.handler.artifacts import INT8_MODEL_FILE, load_torchscript
from fruitserve.handler.classifier import Classifier, cpu_has_native_bf16, load_classifier
from fruitserve.handler.preprocessing import normalize
from fruitserve.train import data as datasets
from fruitserve.train.model import eager_from_torchscript, export_onnx
from fruitserve.train.reports import classification_metrics

from bench.report import DEFAULT_IMAGES, median_ms, save_results

Forward = Callable[[torch.Tensor], torch.Tensor]  # uint8 N x 3 x S x S -> logits


def served(run: Path, precision: str, batch: int) -> Classifier:
    return load_classifier(run, device="cpu", precision=precision, max_batch=batch)


def onnx_runtime(model_path: Path, mean, std, threads: int) -> Forward:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])

    def forward(images: torch.Tensor) -> torch.Tensor:
        inputs = normalize(images, mean, std).numpy()
        return torch.from_numpy(session.run(["logits"], {"images": inputs})[0])

    return forward


def compiled_eager(run: Path, metadata: dict, mean, std) -> Forward:
    eager = eager_from_torchscript(load_torchscript(run / "model.pt", torch.device("cpu")), metadata["arch"],
                                   int(metadata["num_classes"])).to(memory_format=torch.channels_last)
    compiled = torch.compile(eager)

    @torch.inference_mode()
    def forward(images: torch.Tensor) -> torch.Tensor:
        x = normalize(images, mean, std).contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return compiled(x).float()

    return forward


def logits_of(forward: Forward, images: torch.Tensor, batch: int) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([forward(images[i:i + batch]) for i in range(0, len(images), batch)])


def one_image_ms(forward: Forward, images: torch.Tensor, count: int = 100) -> float:
    """Median ms of a forward of one image: what a request that arrives alone waits for the model."""
    with torch.inference_mode():
        return median_ms(lambda image: forward(image[None]), images[:count])


def answered(classifier: Classifier, images: torch.Tensor, batch: int) -> float:
    """The share of ``images`` the uncertainty rule answers (does not flag)."""
    flags = torch.cat([classifier.predict(images[i:i + batch]).uncertain for i in range(0, len(images), batch)])
    return float((~flags).double().mean())


def timed(forward: Forward, batches: list[torch.Tensor]) -> float:
    """img/s over one pass through ``batches``."""
    start = time.perf_counter()
    with torch.inference_mode():
        for batch in batches:
            forward(batch)
    return sum(len(b) for b in batches) / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES, help="folder the answers are compared on")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timing-images", type=int, default=2048, help="images per timing round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--skip", nargs="*", default=[], help="variants to leave out")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    reference = served(args.run, "fp32", args.batch)
    labels, config, metadata = reference.labels, reference.config, reference.metadata
    index = datasets.index_image_folder(args.images, labels)
    decoded = datasets.decode_images(index.paths, index.targets, config, desc="decode", progress=False)

    with tempfile.TemporaryDirectory(prefix="bench-graphs-") as tmp:
        classifiers = {"torchscript fp32 (served)": reference}
        if cpu_has_native_bf16():
            classifiers["torchscript bf16 (served)"] = served(args.run, "bf16", args.batch)
        if (args.run / INT8_MODEL_FILE).is_file():
            classifiers["onnxruntime int8 (served, model.int8.onnx)"] = served(args.run, "int8", args.batch)
        else:
            print(f"no {INT8_MODEL_FILE} in {args.run}: int8 left out (fruit-train export {args.run} --format int8)")
        variants: dict[str, Forward] = {name: c.logits for name, c in classifiers.items()}
        onnx_path = Path(tmp) / "model.onnx"
        size = config.input_size
        eager = eager_from_torchscript(load_torchscript(args.run / "model.pt", torch.device("cpu")),
                                       metadata["arch"], int(metadata["num_classes"]))
        export_onnx(eager, onnx_path, torch.zeros(2, 3, size, size))
        variants["onnxruntime fp32"] = onnx_runtime(onnx_path, config.mean, config.std, args.threads)
        if "compile" not in args.skip and cpu_has_native_bf16():
            start = time.perf_counter()
            variants["torch.compile bf16 (eager, inductor)"] = compiled_eager(args.run, metadata, config.mean,
                                                                              config.std)
            variants["torch.compile bf16 (eager, inductor)"](decoded.images[:args.batch])  # compiles here
            compile_seconds = time.perf_counter() - start
        else:
            compile_seconds = None

        timing = decoded.images[:args.timing_images]
        batches = [timing[i:i + args.batch] for i in range(0, len(timing) - args.batch + 1, args.batch)]
        speeds: dict[str, list[float]] = {name: [] for name in variants}
        for forward in variants.values():  # warm-up: first-run profiling and allocation
            timed(forward, batches[:4])
        for _ in range(args.rounds):  # alternating rounds: each variant sees the same machine weather
            for name, forward in variants.items():
                speeds[name].append(timed(forward, batches))
        single = {name: one_image_ms(forward, timing) for name, forward in variants.items()}

        fp32_logits = logits_of(reference.logits, decoded.images, args.batch)
        fp32_probs = torch.softmax(fp32_logits, dim=1)
        rows = []
        for name, forward in variants.items():
            logits = fp32_logits if forward is reference.logits else logits_of(forward, decoded.images, args.batch)
            metrics = classification_metrics(logits, decoded.targets, labels)
            probs = torch.softmax(logits.float(), dim=1)
            rows.append({"variant": name, "img_per_s": round(statistics.median(speeds[name]), 1),
                         "img_per_s_rounds": [round(v, 1) for v in speeds[name]],
                         "one_image_ms": round(single[name], 2),
                         "answered": (round(answered(classifiers[name], decoded.images, args.batch), 5)
                                      if name in classifiers else None),
                         "top1": round(metrics["top1"], 5), "macro_f1": round(metrics["macro_f1"], 5),
                         "same_top1_as_fp32": round(float((probs.argmax(1) == fp32_probs.argmax(1)).double().mean()), 6),
                         "max_softmax_diff": round(float((probs - fp32_probs).abs().max()), 5)})
            print(rows[-1], flush=True)
    base = rows[0]["img_per_s"]
    for row in rows:
        row["speed_vs_fp32"] = round(row["img_per_s"] / base, 3)
    save_results("inference_graphs", {"run": str(args.run), "images": len(decoded.targets), "batch": args.batch,
                                      "threads": args.threads, "compile_seconds": compile_seconds, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
