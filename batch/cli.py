"""``fruit-batch``: score a whole folder tree to CSV, against TorchServe or locally."""

from __future__ import annotations

import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import click
from fruitserve.handler.classifier import AUTO_PRECISION, PRECISIONS
from fruitserve.handler.errors import ModelDirError
from fruitserve.train.utils import progress

from .errors import BatchError, ServerUnavailable, UsageError
from .remote import PROTOCOLS
from .results import COLUMNS, OutputInUse, OutputLock, ResultWriter
from .sources import Source, folder_labels, open_source

EXIT_CODES = """\b
Exit codes:
  0  every file scored
  1  some files could not be scored (their rows say why)
  2  usage error (bad arguments, unusable model, no such model on the server, rejected token, OUT in use)
  3  server unreachable or not ready (rerun with --resume)
  130 interrupted (rerun with --resume)
"""
ENGINES = ("server", "local", "ray")


@dataclass(frozen=True)
class ScoreOptions:
    """Everything one ``fruit-batch score`` run is asked to do: the command line, as one object."""

    source: str
    out: Path
    engine: str = "server"
    local: bool = False
    model: str | None = None
    urls: tuple[str, ...] = ("http://127.0.0.1:8080",)
    protocol: str = "torchserve"
    host_header: str | None = None
    token: str | None = None
    key_file: Path = Path("key_file.json")
    concurrency: int = 16
    timeout: float = 60.0
    retries: int = 5
    top_k: int | None = None
    labels_from_folders: bool | None = None
    resume: bool = False
    device: str = "auto"
    precision: str = "auto"
    batch_size: int = 64
    workers: int | None = None
    ray_address: str | None = None
    gpus_per_worker: float = 0.0
    min_confidence: float | None = None
    max_distance: float | None = None
    quiet: bool = False

    @property
    def uncertainty(self) -> dict:
        """Overrides of the model's fitted uncertainty thresholds (empty: the model's own)."""
        return {k: v for k, v in (("min_confidence", self.min_confidence), ("max_distance", self.max_distance))
                if v is not None}

    @property
    def mode(self) -> str:
        """The engine that runs: ``--local`` is short for ``--engine local``."""
        if self.local and self.engine not in ("server", "local"):
            raise UsageError(f"--local and --engine {self.engine} contradict each other: choose one")
        return "local" if self.local else self.engine


@click.group()
def main() -> None:
    """Score fruit images in bulk."""


@main.command(epilog=EXIT_CODES)
@click.argument("source", metavar="DIRECTORY")
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--engine", type=click.Choice(ENGINES), default="server", show_default=True,
              help="server: call TorchServe/KServe at --url; local: score in this process; ray: score on a Ray "
                   "cluster (a local one unless --ray-address)")
@click.option("--local", is_flag=True, help="short for --engine local")
@click.option("--model", default=None,
              help="server mode: model name [fruit]; --local: a .mar, run folder or model.pt [model_store/fruit.mar]")
@click.option("--url", "urls", multiple=True, default=("http://127.0.0.1:8080",), show_default=True,
              help="server base address (TorchServe inference address or KServe endpoint); repeat to spread the "
                   "work over several servers")
@click.option("--protocol", type=click.Choice(PROTOCOLS), default="torchserve",
              show_default=True,
              help="torchserve: raw file to /predictions/MODEL; kserve-v1: JSON instances to /v1/models/MODEL:predict; "
                   "kserve-v2: BYTES input to /v2/models/MODEL/infer (TorchServe serves these paths too)")
@click.option("--host-header", default=None,
              help="Host header to send, e.g. the InferenceService hostname when calling KServe's ingress by IP")
@click.option("--token", envvar="FRUIT_TOKEN", help="inference token (env FRUIT_TOKEN; default: from --key-file)")
@click.option("--key-file", type=click.Path(dir_okay=False, path_type=Path), default=Path("key_file.json"),
              show_default=True, help="TorchServe's key_file.json, read when no token is given")
@click.option("--concurrency", type=click.IntRange(1, 256), default=16, show_default=True)
@click.option("--timeout", type=float, default=60.0, show_default=True,
              help="seconds for one request: connecting, sending the file and the whole answer")
@click.option("--retries", type=click.IntRange(0, 20), default=5, show_default=True,
              help="retries for connection errors, 500, 503 and 507 (kserve protocols: also 502 and 504)")
@click.option("--top-k", type=click.IntRange(1, None), default=None, help="how many classes per row [model default]")
@click.option("--labels-from-folders/--no-labels-from-folders", default=None,
              help="true label = first folder under DIRECTORY [default: when every folder names a known class]")
@click.option("--resume", is_flag=True, help="keep the rows already in OUT and score only what is missing")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--precision", type=click.Choice(list(PRECISIONS)), default="auto", show_default=True,
              help=f"--local: auto = {AUTO_PRECISION}")
@click.option("--batch-size", type=click.IntRange(1, 4096), default=64, show_default=True, help="--local batch size")
@click.option("--workers", type=click.IntRange(0, 4096), default=None,
              help="--local: decoding processes [0 on CPU, 4 on CUDA]; --engine ray: actors [one per CPU, or per "
                   "--gpus-per-worker GPUs, of the cluster]")
@click.option("--ray-address", default=None, help="--engine ray: join this cluster (HOST:PORT of its head) instead "
                                                    "of starting a local one")
@click.option("--gpus-per-worker", type=click.FloatRange(0, 64), default=0.0, show_default=True,
              help="--engine ray: GPUs each actor asks for (0: CPU actors)")
@click.option("--min-confidence", type=click.FloatRange(0, 1), default=None,
              help="uncertain below this calibrated confidence [the model's fitted threshold; server mode: can only "
                   "flag more than the server does]")
@click.option("--max-distance", type=click.FloatRange(0, None), default=None,
              help="uncertain beyond this feature distance (ood_score) [the model's fitted threshold; server mode: "
                   "can only flag more]")
@click.option("--quiet", is_flag=True, help="no progress")
def score(**options: object) -> None:
    """Score every image under DIRECTORY into OUT (CSV), one row per file.

    \b
    DIRECTORY is a folder, or a URL of an object store (s3://bucket/prefix; AWS_* variables as usual).

    \b
    Columns: path (relative to DIRECTORY), status (ok/error), label, confidence (calibrated),
    uncertain (true: the model is out of its depth), ood_score, top_k (JSON), true_label, error,
    error_code, model_version, precision.
    """
    try:
        code = run_score(ScoreOptions(**options))
    except BatchError as exc:
        click.echo(f"fruit-batch: error: {exc}", err=True)
        code = exc.exit_code
    sys.exit(code)


def make_scorer(options: ScoreOptions):
    """The engine that scores files: this process (``local``), a Ray cluster (``ray``) or servers over HTTP."""
    if options.mode == "local":
        return _local_scorer(options)
    if options.mode == "ray":
        return _ray_scorer(options)
    from fruitserve.model_store.torchserve_process import read_tokens

    from .remote import RemoteScorer

    token = options.token
    if token is None and options.key_file.is_file():
        try:
            token = read_tokens(options.key_file).get("inference")
        except (OSError, ValueError, KeyError) as exc:
            raise UsageError(f"cannot read a token from {options.key_file}: {exc}") from None
    return RemoteScorer(list(options.urls), options.model or "fruit", token, options.concurrency, options.timeout,
                        retries=options.retries, top_k=options.top_k, protocol=options.protocol,
                        host_header=options.host_header, uncertainty=options.uncertainty)


def _local_scorer(options: ScoreOptions):
    import os

    from fruitserve.handler.classifier import load_classifier, select_device

    from .local import LocalScorer

    if options.protocol != "torchserve":
        raise UsageError("--protocol chooses how to call a server; it cannot be combined with --local")
    try:
        device = select_device(options.device)
        classifier = load_classifier(options.model or "model_store/fruit.mar", device=device,
                                     precision=options.precision, max_batch=options.batch_size,
                                     uncertainty=options.uncertainty)
    except (ValueError, ModelDirError) as exc:
        raise UsageError(f"{options.model or 'model_store/fruit.mar'}: {exc}") from None
    # On CPU the forward pass already uses every core: decoding in the same process measured faster than one
    # DataLoader worker on 2 cores (BENCHMARKS.md, Batch scoring). On CUDA, workers keep the GPU fed.
    workers = options.workers if options.workers is not None else (
        min(4, os.cpu_count() or 1) if device.type == "cuda" else 0)
    return LocalScorer(classifier, options.batch_size, workers, options.top_k)


def _ray_scorer(options: ScoreOptions):
    from .ray_engine import RayScorer

    if options.protocol != "torchserve":
        raise UsageError("--protocol chooses how to call a server; it cannot be combined with --engine ray")
    try:
        return RayScorer(Path(options.model or "model_store/fruit.mar"), options)
    except ModelDirError as exc:
        raise UsageError(f"{options.model or 'model_store/fruit.mar'}: {exc}") from None


def run_score(options: ScoreOptions) -> int:
    """Score, holding OUT's lock for the whole run: a second run on the same file stops before it does any work."""
    source = open_source(options.source)
    try:
        with OutputLock(options.out):
            return _score_locked(options, source)
    except OutputInUse as exc:
        raise UsageError(str(exc)) from None


def _score_locked(options: ScoreOptions, source: Source) -> int:
    paths, ignored = source.list()
    scorer = make_scorer(options)  # before the writer: a model that cannot be loaded leaves OUT as it was
    try:
        writer = ResultWriter(options.out, paths, options.resume)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    todo = [p for p in paths if p not in writer.rows]
    stop = threading.Event()
    previous_sigterm = signal.signal(signal.SIGTERM, _interrupt)
    start = time.perf_counter()
    interrupted = unavailable = None
    bar = progress(total=len(todo), desc="scoring", unit="img", disable=options.quiet)
    scored = 0
    try:
        for result in scorer.score(source, todo, stop):
            writer.add(result)
            scored += 1
            bar.update(1)
    except KeyboardInterrupt:
        interrupted = True
        stop.set()
    except ServerUnavailable as exc:
        unavailable = exc
    finally:
        bar.close()
        labels = getattr(scorer, "labels", None)
        truth = _truth(writer.rows, paths, options.labels_from_folders, labels)
        writer.finish()
        signal.signal(signal.SIGTERM, previous_sigterm)
    rows, elapsed = writer.rows, time.perf_counter() - start
    line = (f"{len(rows)}/{len(paths)} files in {options.out}: {_counts(rows)}; {scored} scored this run in "
            f"{elapsed:.1f} s ({scored / max(elapsed, 1e-9):.1f} img/s)")
    if ignored:
        line += f"; {ignored} non-image files passed over"
    if getattr(scorer, "startup_seconds", None) is not None:
        line += f"; the first rows came after {scorer.startup_seconds:.1f} s (Ray and its actors starting)"
    accuracy = _accuracy(rows, truth, labels) if truth else None
    if accuracy:
        line += f"; accuracy {accuracy[0]:.4f}, macro-F1 {accuracy[1]:.4f} on {accuracy[2]} labelled images"
    click.echo(line, err=True)
    if interrupted:
        click.echo(f"fruit-batch: interrupted; {len(rows)}/{len(paths)} rows in {options.out}. Rerun with --resume.",
                   err=True)
        return 130
    if unavailable is not None:
        click.echo(f"fruit-batch: {unavailable}. {len(rows)}/{len(paths)} rows in {options.out}; rerun with --resume.",
                   err=True)
        return ServerUnavailable.exit_code
    return 1 if any(r["status"] != "ok" for r in rows.values()) else 0


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM stops a run the way Ctrl-C does: what finished is kept and the CSV is rewritten cleanly."""
    raise KeyboardInterrupt


def _counts(rows: dict[str, dict[str, str]]) -> str:
    ok = sum(r["status"] == "ok" for r in rows.values())
    uncertain = sum(r["uncertain"] == "true" for r in rows.values())
    return f"{ok} ok ({uncertain} uncertain), {len(rows) - ok} errors"


def _truth(rows: dict[str, dict[str, str]], paths: list[str], labels_from_folders: bool | None,
           classes: list[str] | None) -> dict[str, str]:
    """True labels from folder names, written into ``rows``; auto-detected unless the flag says otherwise."""
    if labels_from_folders is False:
        return {}
    if labels_from_folders:
        classes = sorted({p.partition("/")[0] for p in paths if "/" in p})
    elif classes is None:  # server mode: every folder must be named like a label the server answered with
        classes = sorted({r["label"] for r in rows.values() if r["label"]})
    labels = folder_labels(paths, classes)
    if labels is None:
        if labels_from_folders:
            raise UsageError("--labels-from-folders: every file must sit under a folder named after a class")
        return {}
    for rel, name in labels.items():
        row = rows.get(rel)
        if row is not None:
            row["true_label"] = name
    return labels


def _accuracy(rows, truth: dict[str, str], classes: list[str] | None) -> tuple[float, float, int] | None:
    import torch
    from fruitserve.train.reports import label_metrics

    scored = [(truth[p], r["label"]) for p, r in rows.items() if r["status"] == "ok" and p in truth]
    if not scored:
        return None
    names = sorted(set(classes or []) | {t for t, _ in scored} | {p for _, p in scored})
    index = {n: i for i, n in enumerate(names)}
    metrics = label_metrics(torch.tensor([index[t] for t, _ in scored]), torch.tensor([index[p] for _, p in scored]),
                            names)
    return metrics["top1"], metrics["macro_f1"], len(scored)


__all__ = ["main", "COLUMNS", "ScoreOptions", "run_score"]
