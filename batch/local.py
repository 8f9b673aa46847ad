"""Score files in this process with the handler's own loader and forward pass, batched, on CUDA when present."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import torch
from fruitserve.handler.classifier import Classifier
from fruitserve.handler.errors import InputError
from fruitserve.handler.predictions import clamp_top_k
from fruitserve.handler.preprocessing import PreprocessConfig, load_uint8
from torch.utils.data import DataLoader, Dataset

from .results import Result
from .sources import RemoteFolder, Source


def decode(source: Source, path: str, config: PreprocessConfig) -> torch.Tensor | Result:
    """One file through the shared preprocessing, or its error row: a bad file is never an exception."""
    try:
        return load_uint8(source.read(path), config)
    except InputError as exc:
        return Result.failed(path, str(exc), exc.status)
    except OSError as exc:
        return Result.failed(path, f"cannot read file: {exc.strerror or exc}")


# Objects in a store are read over the network: one GET at a time would leave the cores waiting (BENCHMARKS.md,
# Batch scoring). Threads overlap the reads; sockets and Pillow's decoder release the GIL.
READ_THREADS = 16


def decode_batch(source: Source, paths: list[str], config: PreprocessConfig,
                 pool: ThreadPoolExecutor | None = None) -> list[tuple[str, torch.Tensor | Result]]:
    """Files of one batch, decoded (in ``pool`` when given), in their order."""
    decoded = pool.map(lambda p: decode(source, p, config), paths) if pool else (decode(source, p, config) for p in paths)
    return list(zip(paths, decoded, strict=True))


def score_decoded(classifier: Classifier, items: list[tuple[str, torch.Tensor | Result]], k: int) -> list[Result]:
    """Rows for one batch of decoded files, in the batch's order: error rows as they are, the rest scored at once."""
    valid = [(path, item) for path, item in items if not isinstance(item, Result)]
    answers = iter(classifier.answers(torch.stack([t for _, t in valid]), [k] * len(valid)) if valid else [])
    return [item if isinstance(item, Result) else Result.ok(path, next(answers)) for path, item in items]


class _Files(Dataset):
    """Decodes one file in a DataLoader worker."""

    def __init__(self, source: Source, paths: list[str], config: PreprocessConfig) -> None:
        self.source, self.paths, self.config = source, paths, config

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[str, torch.Tensor | Result]:
        return self.paths[i], decode(self.source, self.paths[i], self.config)


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # decoding workers must not fight the forward pass for cores


class LocalScorer:
    """``fruit-batch --local``: DataLoader workers decode (none on CPU, where the forward pass has every core),
    the classifier scores whole batches."""

    def __init__(self, classifier: Classifier, batch_size: int = 64, workers: int = 0, top_k: int | None = None) -> None:
        self.classifier = classifier
        self.labels = classifier.labels
        self.batch_size, self.workers = batch_size, workers
        self.k = clamp_top_k(top_k, len(classifier.labels))

    def score(self, source: Source, paths: list[str], stop: threading.Event) -> Iterator[Result]:
        if isinstance(source, RemoteFolder):
            yield from self._score_remote(source, paths, stop)
            return
        loader = DataLoader(_Files(source, paths, self.classifier.config), batch_size=self.batch_size,
                            num_workers=self.workers, collate_fn=list, worker_init_fn=_worker_init if self.workers else None,
                            prefetch_factor=4 if self.workers else None)
        for items in loader:
            if stop.is_set():
                break
            yield from score_decoded(self.classifier, items, self.k)

    def _score_remote(self, source: RemoteFolder, paths: list[str], stop: threading.Event) -> Iterator[Result]:
        """Objects: the next batch is read by threads while this one runs through the model."""
        batches = [paths[i:i + self.batch_size] for i in range(0, len(paths), self.batch_size)]
        with ThreadPoolExecutor(READ_THREADS) as pool, ThreadPoolExecutor(1) as ahead:
            upcoming = ahead.submit(decode_batch, source, batches[0], self.classifier.config, pool) if batches else None
            for i in range(len(batches)):
                items = upcoming.result()
                if stop.is_set():
                    break
                if i + 1 < len(batches):
                    upcoming = ahead.submit(decode_batch, source, batches[i + 1], self.classifier.config, pool)
                yield from score_decoded(self.classifier, items, self.k)
