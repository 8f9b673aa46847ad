"""int8: the served graph quantised for ONNX Runtime, calibrated on the run's own validation images.

``fruit-train export RUN --format int8`` writes ``model.int8.onnx`` beside ``model.pt``: the graph the loader
serves (uint8 images in; normalisation, ResNet, logits and penultimate features out), exported to ONNX and
statically quantised (QDQ; int8 weights per output channel, uint8 activations: the form x86 VNNI kernels run).
Activation ranges come from validation images, never from Test; the export then says how often the int8 graph
gives fp32's label on the whole validation split. ``precision: int8`` (handler) or ``--precision int8``
(``fruit-batch --local``, ``fruit-train evaluate``) serves it; BENCHMARKS.md, Serving, has what it costs and buys.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from fruitserve.handler.artifacts import INT8_MODEL_FILE, METADATA_FILE, MODEL_FILE, load_metadata, load_torchscript
from fruitserve.handler.classifier import ServingModule
from fruitserve.handler.preprocessing import PreprocessConfig

from .model import eager_from_torchscript, export_onnx

CALIBRATION_BATCH = 32
# enough for stable activation ranges: the export then checks int8 against fp32 on the whole validation split
CALIBRATION_IMAGES = 512


def quantize_run(run: Path, calibration: torch.Tensor) -> Path:
    """``run/model.int8.onnx`` from ``run/model.pt``, activation ranges from ``calibration`` (uint8 N x 3 x S x S)."""
    try:
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError:
        raise ValueError("int8 export needs the onnx extra: pip install 'fruitserve[onnx]'") from None
    if len(calibration) == 0:
        raise ValueError("no calibration images: the run's validation split is empty or unreadable")
    metadata = load_metadata(run / METADATA_FILE)
    config = PreprocessConfig.from_metadata(metadata)
    eager = eager_from_torchscript(load_torchscript(run / MODEL_FILE, torch.device("cpu")), metadata["arch"],
                                   int(metadata["num_classes"]))
    batches = [calibration[i:i + CALIBRATION_BATCH].numpy() for i in range(0, len(calibration), CALIBRATION_BATCH)]

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self.remaining = iter(batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.remaining, None)
            return None if batch is None else {"images": batch}

    out = run / INT8_MODEL_FILE
    with tempfile.TemporaryDirectory(prefix="fruit-int8-") as scratch:
        fp32, prepared, quantized = (Path(scratch) / name for name in ("fp32.onnx", "prepared.onnx", "int8.onnx"))
        size = config.input_size
        export_onnx(ServingModule(eager, config, torch.float32), fp32, torch.zeros(2, 3, size, size, dtype=torch.uint8),
                    outputs=("logits", "features"))
        quant_pre_process(str(fp32), str(prepared))  # shape inference and graph clean-up, as ORT recommends
        quantize_static(str(prepared), str(quantized), Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        partial = out.with_name(out.name + ".tmp")  # the run folder may be on another file system than /tmp
        shutil.copyfile(quantized, partial)
        os.replace(partial, out)
    return out
