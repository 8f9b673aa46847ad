"""Load a trained model once and run it: the one path from a batch of uint8 images to answers.

The TorchServe handler, ``fruit-batch --local`` and its Ray engine, ``fruit-train evaluate`` and the benchmarks
all call ``load_classifier`` and ``Classifier.predict``, so they score the same graph in the same precision.

The exported ``model.pt`` stays the fp32 TorchScript a user can ``torch.jit.load`` anywhere. The graph that runs
is derived from it here, at load time: normalisation folded in, the penultimate features returned next to the
logits (the out-of-distribution score needs them), cast to the precision the device runs fastest at the same
answers, then frozen. The one exception is int8: its graph is the run's ``model.int8.onnx`` (quantising needs
calibration images, so ``fruit-train`` makes it), run by ONNX Runtime with the same contract. See BENCHMARKS.md,
Serving, for what each step buys.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from fruitserve.handler.artifacts import (
    INT8_MODEL_FILE,
    LABELS_FILE,
    METADATA_FILE,
    MODEL_FILE,
    TORCHSCRIPT_DEPRECATION,
    load_labels,
    load_metadata,
    load_torchscript,
    model_dir,
)
from fruitserve.handler.errors import ModelDirError
from fruitserve.handler.predictions import format_predictions
from fruitserve.handler.preprocessing import PreprocessConfig
from fruitserve.handler.uncertainty import UncertaintyRule

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")
# what ``resolve_precision`` picks for "auto", for the command-line help of every tool that loads a model
AUTO_PRECISION = ("int8 on CPUs with VNNI when the model has model.int8.onnx, else bf16 on CPUs with native "
                  "bf16, fp16 on CUDA, else fp32 (as served)")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# the parts of a torchvision ResNet, in the order its forward calls them
RESNET_STEM = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool")


def select_device(name: str | torch.device = "auto") -> torch.device:
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for, but CUDA is not available on this machine")
    return torch.device(name)


def cpu_flags() -> set[str] | None:
    """The CPU's feature flags (Linux), or None where /proc/cpuinfo cannot say."""
    try:
        return set(Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").split())
    except OSError:
        return None


def cpu_has_native_bf16() -> bool:
    """oneDNN runs bf16 on any AVX-512 CPU, but only AVX-512 BF16 or AMX do it in hardware; elsewhere it is
    emulated and slower than fp32."""
    if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        return False
    flags = cpu_flags()
    return flags is None or bool(flags & {"avx512_bf16", "amx_bf16"})  # not Linux: trust oneDNN


def cpu_has_vnni() -> bool:
    """x86 int8 dot products in hardware (AVX-512 VNNI, AVX-VNNI, AMX). ONNX Runtime's uint8 x int8 kernels are
    exact there; without VNNI they can saturate, so int8 is only chosen on a CPU that has it."""
    return bool((cpu_flags() or set()) & {"avx512_vnni", "avx_vnni", "amx_int8"})


def int8_servable(folder: Path) -> bool:
    """``auto`` may pick int8: the model has its int8 graph, ONNX Runtime is installed and the CPU has VNNI."""
    return (folder / INT8_MODEL_FILE).is_file() and importlib.util.find_spec("onnxruntime") is not None \
        and cpu_has_vnni()


def resolve_precision(precision: str, device: torch.device, int8_available: bool = False) -> str:
    """``auto``: on a CPU, int8 where ``int8_available`` (see ``int8_servable``), else bf16 where the CPU has native
    bf16, else fp32 (an AVX2 CPU keeps fp32's speed); fp16 on CUDA."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        if device.type == "cuda":
            return "fp16"
        if int8_available:
            return "int8"
        return "bf16" if cpu_has_native_bf16() else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("fp16 is for CUDA; on a CPU use bf16 (where it has native bf16) or fp32")
    if precision == "int8" and device.type != "cpu":
        raise ValueError("int8 runs on the CPU (ONNX Runtime); on CUDA use fp16")
    return precision


class ServingModule(torch.nn.Module):
    """uint8 NCHW images -> (logits, penultimate features), both float32; normalised and cast inside."""

    def __init__(self, net: torch.nn.Module, config: PreprocessConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(config.mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(config.std, dtype=torch.float32).view(1, 3, 1, 1))
        self.dtype = dtype

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # the arithmetic of preprocessing.normalize, so training and serving see the same numbers
        x = (images.float() / 255.0 - self.mean) / self.std
        # channels-last is oneDNN's (and cuDNN's) fast layout for convolutions
        x = x.to(self.dtype).contiguous(memory_format=torch.channels_last)
        net = self.net
        x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        x = net.avgpool(net.layer4(net.layer3(net.layer2(net.layer1(x)))))
        features = torch.flatten(x, 1)
        return net.fc(features).float(), features.float()


def inference_graph(net: torch.nn.Module, config: PreprocessConfig, device: torch.device,
                    precision: str) -> torch.jit.ScriptModule:
    """The frozen TorchScript graph that serves ``net`` (a torchvision ResNet, scripted or eager) in ``precision``.
    ``net`` itself is cast to that precision on the way.

    Tracing the wrapper and freezing it lets TorchScript fold batch norm into the convolutions and the
    normalisation into the first one; ``optimize_for_inference`` then keeps activations in oneDNN's layout.
    """
    missing = [name for name in (*RESNET_STEM, "fc") if not hasattr(net, name)]
    if missing:
        raise ModelDirError(f"the model is not a torchvision ResNet (no {', '.join(missing)}); fruitserve serves "
                            "the ResNets fruit-train exports")
    example = torch.zeros(2, 3, config.input_size, config.input_size, dtype=torch.uint8, device=device)
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.filterwarnings("ignore", message=TORCHSCRIPT_DEPRECATION, category=FutureWarning)
        net = net.eval().to(device=device, dtype=DTYPES[precision])
        traced = torch.jit.trace(ServingModule(net, config, DTYPES[precision]).to(device).eval(), example,
                                 check_trace=False)
        return torch.jit.optimize_for_inference(torch.jit.freeze(traced))


class OnnxGraph:
    """An ONNX Runtime session with the TorchScript graph's contract: uint8 images -> (logits, features).

    For the int8 graph (``fruit-train export --format int8``): ONNX Runtime's int8 kernels (VNNI on x86) run a
    batch of one several times faster than oneDNN's TorchScript (BENCHMARKS.md, Serving)."""

    def __init__(self, path: Path, threads: int) -> None:
        try:
            import onnxruntime
        except ImportError:
            raise ModelDirError("precision int8 needs ONNX Runtime: pip install 'fruitserve[onnx]'") from None
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # ONNX Runtime's threads spin between runs by default; in a TorchServe worker that takes the cores the
        # frontend and the next batch's decoding need (the A/B: docs/benchmark-log.md, 2026-11-30, night)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, features = self.session.run(["logits", "features"], {"images": images.numpy()})
        return torch.from_numpy(logits), torch.from_numpy(features)


@dataclass
class Prediction:
    """What one forward pass says about a batch, on the CPU: calibrated class probabilities, the features behind
    them, their distance from the training data, and the uncertainty rule's verdict."""

    probabilities: torch.Tensor  # N x classes, float32
    features: torch.Tensor  # N x D penultimate features, float32
    distances: torch.Tensor  # N, cosine distance to the nearest training image of the predicted class (NaN: none)
    uncertain: torch.Tensor  # N, bool


@dataclass
class Classifier:
    """A loaded model, ready to score batches of preprocessed uint8 images (``preprocessing.load_uint8``)."""

    graph: torch.nn.Module | OnnxGraph  # uint8 N x 3 x S x S -> (logits, features)
    labels: list[str]
    config: PreprocessConfig
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    precision: str = "fp32"
    model_version: str | None = None
    metadata: dict = field(default_factory=dict)
    max_batch: int = 64  # larger inputs run in chunks of this many images
    uncertainty: UncertaintyRule = field(default_factory=UncertaintyRule)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Raw logits (float32, CPU) for a uint8 batch: what evaluation computes its metrics and loss from."""
        return self.logits_and_features(images)[0]

    def predict(self, images: torch.Tensor) -> Prediction:
        logits, features = self.logits_and_features(images)
        probabilities, distances, uncertain = self.uncertainty.assess(logits, features)
        return Prediction(probabilities, features, distances, uncertain)

    def answers(self, images: torch.Tensor, top_k: Sequence[int]) -> list[dict]:
        """One JSON-ready answer per image, each with its own top-k (see ``predictions.format_predictions``)."""
        prediction = self.predict(images)
        return format_predictions(prediction.probabilities, self.labels, top_k, self.model_version, self.precision,
                                  prediction.uncertain.tolist(), prediction.distances.tolist())

    @torch.inference_mode()
    def logits_and_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw logits and penultimate features (float32, CPU) for a uint8 batch of any size."""
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"expected a uint8 N x 3 x H x W batch, got {images.dtype} {tuple(images.shape)}")
        outputs = [self.graph(images[i:i + self.max_batch].to(self.device, non_blocking=True))
                   for i in range(0, len(images), self.max_batch)]
        logits = torch.cat([o[0] for o in outputs]) if outputs else torch.empty(0, len(self.labels))
        features = torch.cat([o[1] for o in outputs]) if outputs else torch.empty(0, 0)
        return logits.cpu(), features.cpu()

    def check(self) -> None:
        """Run blank images through the graph: its class count must match the labels, or every answer would be
        wrong. Also the warm-up, so the first real request does not pay for TorchScript's first-run profiling."""
        size = self.config.input_size
        for batch in (1, 2, min(8, self.max_batch), self.max_batch):
            logits = self.logits(torch.zeros(batch, 3, size, size, dtype=torch.uint8))
        if logits.ndim != 2 or logits.shape[1] != len(self.labels):
            raise ModelDirError(f"the model gives {tuple(logits.shape[1:])} outputs per image, but {LABELS_FILE} names "
                                f"{len(self.labels)} classes: model.pt and {LABELS_FILE} come from different runs")


def load_classifier(source: str | os.PathLike, *, device: str | torch.device = "auto", precision: str = "auto",
                    max_batch: int = 64, max_pixels: int | None = None, uncertainty: dict | None = None) -> Classifier:
    """A run folder, its ``model.pt`` or a ``.mar``, loaded for inference on ``device`` in ``precision``.

    ``max_pixels`` overrides the decoded-size limit of the run's metadata (the handler's ``max_pixels`` setting);
    ``uncertainty`` overrides the fitted thresholds (``min_confidence``, ``max_distance``).
    """
    device = select_device(device)
    with model_dir(source) as folder:
        precision = resolve_precision(precision, device, int8_servable(folder))
        metadata = load_metadata(folder / METADATA_FILE)
        labels = load_labels(folder / LABELS_FILE)
        rule = UncertaintyRule.from_run(metadata, folder, uncertainty)
        config = PreprocessConfig.from_metadata(metadata)
        if precision == "int8":
            if not (folder / INT8_MODEL_FILE).is_file():
                raise ModelDirError(f"precision int8 needs {INT8_MODEL_FILE} beside {MODEL_FILE}: make it with "
                                    "`fruit-train export RUN --format int8` (then archive the run again)")
            graph = OnnxGraph(folder / INT8_MODEL_FILE, torch.get_num_threads())
        else:
            graph = inference_graph(load_torchscript(folder / MODEL_FILE, torch.device("cpu")), config, device,
                                    precision)
    if max_pixels:
        config = PreprocessConfig(config.input_size, config.mean, config.std, int(max_pixels))
    classifier = Classifier(graph, labels, config, device, precision, str(metadata.get("model_version")), metadata,
                            max(1, max_batch), rule)
    classifier.check()
    log.info("fruit model %s on %s in %s: %d classes, input %d px; uncertain below calibrated confidence %.3f%s",
             classifier.model_version, device, precision, len(labels), config.input_size, rule.min_confidence,
             f" or beyond feature distance {rule.max_distance:.4f}" if rule.max_distance is not None else
             " (no feature statistics)")
    return classifier


def wrap_module(net: torch.nn.Module, labels: list[str], config: PreprocessConfig, device: torch.device,
                max_batch: int = 256) -> Classifier:
    """An eager (training) model as a Classifier, in fp32, so validation during training runs the same path."""
    return Classifier(ServingModule(net, config, torch.float32), labels, config, device, "fp32", None, {}, max_batch)
