"""Score files in this process: the handler's preprocessing and postprocessing, batched, on CUDA when present."""

from __future__ import annotations

import tempfile
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import torch
from fruitserve.handler.artifacts import (
    LABELS_FILE,
    METADATA_FILE,
    MODEL_FILE,
    ModelDirError,
    check_outputs,
    load_for_inference,
    load_labels,
    load_metadata,
    missing_files,
)
from fruitserve.handler.predictions import clamp_top_k, format_predictions, probabilities
from fruitserve.handler.preprocessing import InputError, PreprocessConfig, load_uint8, normalize
from torch.utils.data import DataLoader, Dataset

from .errors import UsageError
from .results import Result


class _Files(Dataset):
    """Decodes one file in a DataLoader worker; a bad file becomes an error, never an exception."""

    def __init__(self, root: Path, paths: list[Path], config: PreprocessConfig) -> None:
        self.root, self.paths, self.config = root, paths, config

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str, int | None]:
        try:
            return i, load_uint8((self.root / self.paths[i]).read_bytes(), self.config), "", None
        except InputError as exc:
            return i, None, str(exc), exc.status
        except OSError as exc:
            return i, None, f"cannot read file: {exc.strerror or exc}", None


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # decoding workers must not fight the forward pass for cores


def resolve_model_dir(model: Path, scratch: Path) -> Path:
    """A run folder, a ``model.pt`` inside one, or a ``.mar`` (unpacked into ``scratch``)."""
    if model.suffix == ".mar":
        if not model.is_file():
            raise UsageError(f"no model archive at {model}")
        with zipfile.ZipFile(model) as archive:
            archive.extractall(scratch, members=[n for n in archive.namelist()
                                                 if n in (MODEL_FILE, LABELS_FILE, METADATA_FILE)])
        model = scratch
    elif model.is_file():
        model = model.parent
    missing = missing_files(model)
    if missing:
        raise UsageError(f"{model} is not a usable model: missing {', '.join(missing)}")
    return model


class LocalScorer:
    def __init__(self, model: Path, device: torch.device, batch_size: int = 64, workers: int = 1,
                 top_k: int | None = None, threads: int | None = None) -> None:
        self._scratch = tempfile.TemporaryDirectory(prefix="fruit-batch-")
        model_dir = resolve_model_dir(Path(model), Path(self._scratch.name))
        metadata = load_metadata(model_dir / METADATA_FILE)
        self.config = PreprocessConfig.from_metadata(metadata)
        self.labels = load_labels(model_dir / LABELS_FILE)
        self.model_version = str(metadata.get("model_version"))
        self.device = device
        if threads:
            torch.set_num_threads(threads)
        self.model = load_for_inference(model_dir / MODEL_FILE, device)
        try:
            check_outputs(self.model, len(self.labels), self.config.input_size, device)
        except ModelDirError as exc:
            raise UsageError(f"{model}: {exc}") from None
        self.batch_size, self.workers = batch_size, workers
        self.k = clamp_top_k(top_k, len(self.labels))

    def score(self, root: Path, paths: list[Path], stop: threading.Event) -> Iterator[Result]:
        cuda = self.device.type == "cuda"
        loader = DataLoader(_Files(root, paths, self.config), batch_size=self.batch_size, num_workers=self.workers,
                            collate_fn=list, pin_memory=cuda, worker_init_fn=_worker_init if self.workers else None,
                            prefetch_factor=4 if self.workers else None)
        for items in loader:
            if stop.is_set():
                break
            for i, _, error, code in items:
                if error:
                    yield Result.failed(paths[i].as_posix(), error, code)
            valid = [(i, tensor) for i, tensor, _, _ in items if tensor is not None]
            if not valid:
                continue
            batch = torch.stack([t for _, t in valid])
            if cuda:
                batch = batch.pin_memory()
            with torch.inference_mode(), torch.autocast("cuda", enabled=cuda):
                logits = self.model(normalize(batch.to(self.device, non_blocking=True), self.config.mean,
                                              self.config.std))
            predictions = format_predictions(probabilities(logits).cpu(), self.labels, [self.k] * len(valid),
                                             self.model_version)
            for (i, _), prediction in zip(valid, predictions, strict=True):
                yield Result.ok(paths[i].as_posix(), prediction)
