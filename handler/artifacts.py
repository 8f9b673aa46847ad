"""Reading a model directory: TorchScript, labels and metadata. Shipped inside ``fruit.mar``."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch

MODEL_FILE = "model.pt"
LABELS_FILE = "index_to_name.json"
METADATA_FILE = "metadata.json"
REQUIRED_FILES = (MODEL_FILE, LABELS_FILE, METADATA_FILE)

# torch 2.14 deprecates torch.jit; TorchScript is still the format TorchServe loads
# without our code, so this one expected warning is filtered where we call it.
TORCHSCRIPT_DEPRECATION = r"`torch\.jit\.\w+` is deprecated"


class ModelDirError(Exception):
    """A run directory or model store entry that lacks what serving needs."""


def missing_files(model_dir: str | os.PathLike) -> list[str]:
    return [name for name in REQUIRED_FILES if not (Path(model_dir) / name).is_file()]


def load_torchscript(path: str | os.PathLike, device: torch.device) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=TORCHSCRIPT_DEPRECATION, category=FutureWarning)
        model = torch.jit.load(str(path), map_location=device)
    return model.eval()


def load_for_inference(path: str | os.PathLike, device: torch.device) -> torch.jit.ScriptModule:
    """The exported TorchScript, frozen and optimised the way it is served.

    ``optimize_for_inference`` folds batch norm into the convolutions and, on CPU, keeps
    activations in oneDNN's layout: measured 10-35 % faster per image on 2 cores at
    batch 1 (BENCHMARKS.md). Serving, ``fruit-batch --local``, ``fruit-train evaluate`` and
    the benchmarks' in-process ceiling all load through here, so they score the same graph.
    """
    model = load_torchscript(path, device)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=TORCHSCRIPT_DEPRECATION, category=FutureWarning)
        return torch.jit.optimize_for_inference(model)


def check_outputs(model: torch.jit.ScriptModule, num_labels: int, input_size: int, device: torch.device) -> None:
    """Run one blank image through the model: its class count must match the labels, or every answer would be wrong.

    Also the warm-up, so the first real request does not pay for TorchScript's first-run optimisation.
    """
    with torch.inference_mode():
        for batch in (1, 8):
            outputs = model(torch.zeros(batch, 3, input_size, input_size, device=device))
    if outputs.ndim != 2 or outputs.shape[1] != num_labels:
        raise ModelDirError(f"the model gives {tuple(outputs.shape[1:])} outputs per image, but {LABELS_FILE} "
                            f"names {num_labels} classes: model.pt and {LABELS_FILE} come from different runs")


def load_labels(path: str | os.PathLike) -> list[str]:
    """``index_to_name.json`` (TorchServe's format) to a list indexed by class id."""
    with open(path, encoding="utf-8") as handle:
        mapping = json.load(handle)
    try:
        return [mapping[str(i)] for i in range(len(mapping))]
    except KeyError as exc:
        raise ModelDirError(f"{path}: class ids must run 0..{len(mapping) - 1}; missing {exc}") from None


def load_metadata(path: str | os.PathLike) -> dict:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)
