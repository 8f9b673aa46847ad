"""The files of a trained model: where they are (run folder, ``model.pt``, ``.mar``) and how to read them.

A run folder and ``fruit.mar`` hold the same files: the TorchScript model, its labels and its metadata (and, for
runs that have it, the out-of-distribution statistics). ``require_files`` is the one check that they are there.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path

import torch
from fruitserve.handler.errors import ModelDirError

MODEL_FILE = "model.pt"
LABELS_FILE = "index_to_name.json"
METADATA_FILE = "metadata.json"
REQUIRED_FILES = (MODEL_FILE, LABELS_FILE, METADATA_FILE)
# Fitted after training (the training split's normalised penultimate features, by class); absent in older runs.
FEATURE_STATS_FILE = "feature_stats.npz"  # plain arrays: read without pickle (allow_pickle=False)
# Optional: the int8 graph (ONNX, statically quantised on the run's validation images by `fruit-train export
# --format int8`). Shipped as a second file because quantising needs calibration images, which a server lacks.
INT8_MODEL_FILE = "model.int8.onnx"
MODEL_FILES = (*REQUIRED_FILES, FEATURE_STATS_FILE, INT8_MODEL_FILE)

# torch 2.14 deprecates torch.jit; TorchScript is still the format TorchServe loads
# without our code, so this one expected warning is filtered where we call it.
TORCHSCRIPT_DEPRECATION = r"`torch\.jit\.\w+` is deprecated"


def require_files(model_dir: str | os.PathLike, what: str = "a model") -> Path:
    """``model_dir`` as a Path, or a ModelDirError naming every required file it lacks."""
    model_dir = Path(model_dir)
    missing = [name for name in REQUIRED_FILES if not (model_dir / name).is_file()]
    if missing:
        raise ModelDirError(f"{model_dir} is not {what}: missing {', '.join(missing)} "
                            f"(a training run holds {', '.join(REQUIRED_FILES)})")
    return model_dir


@contextlib.contextmanager
def model_dir(source: str | os.PathLike) -> Iterator[Path]:
    """The folder holding a model's files: a run folder, the folder of a ``model.pt``, or a ``.mar`` unpacked
    into a temporary folder that lives as long as the ``with`` block."""
    source = Path(source)
    if source.suffix == ".mar":
        if not source.is_file():
            raise ModelDirError(f"no model archive at {source}")
        with tempfile.TemporaryDirectory(prefix="fruit-mar-") as scratch:
            try:
                with zipfile.ZipFile(source) as archive:
                    archive.extractall(scratch, members=[n for n in archive.namelist() if n in MODEL_FILES])
            except zipfile.BadZipFile:
                raise ModelDirError(f"{source} is not a model archive (not a zip file)") from None
            yield require_files(scratch, f"a complete archive ({source})")
        return
    if source.is_file():
        source = source.parent
    elif not source.exists():
        raise ModelDirError(f"no model at {source}: give a run folder, its model.pt or a .mar")
    yield require_files(source, "a complete training run")


def load_torchscript(path: str | os.PathLike, device: torch.device) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=TORCHSCRIPT_DEPRECATION, category=FutureWarning)
        model = torch.jit.load(str(path), map_location=device)
    return model.eval()


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
