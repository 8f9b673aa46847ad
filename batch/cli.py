"""``fruit-batch``: score a whole folder tree to CSV, against TorchServe or locally."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import click
from tqdm import tqdm

from .errors import BatchError, ServerUnavailable, UsageError
from .files import find_images, folder_labels
from .remote import PROTOCOLS
from .results import COLUMNS, ResultWriter

EXIT_CODES = """\b
Exit codes:
  0  every file scored
  1  some files could not be scored (their rows say why)
  2  usage error (bad arguments, unusable model, no such model on the server, rejected token)
  3  server unreachable or not ready (rerun with --resume)
  130 interrupted (rerun with --resume)
"""


@click.group()
def main() -> None:
    """Score fruit images in bulk."""


@main.command(epilog=EXIT_CODES)
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--local", is_flag=True, help="score in this process instead of calling a server")
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
@click.option("--batch-size", type=click.IntRange(1, 4096), default=64, show_default=True, help="--local batch size")
@click.option("--workers", type=click.IntRange(0, 64), default=None, help="--local decoding processes [0 on CPU, 4 on CUDA]")
@click.option("--quiet", is_flag=True, help="no progress bar")
def score(directory: Path, out: Path, local: bool, model: str | None, urls: tuple[str, ...], protocol: str,
          host_header: str | None, token: str | None, key_file: Path, concurrency: int, timeout: float, retries: int,
          top_k: int | None,
          labels_from_folders: bool | None, resume: bool, device: str, batch_size: int, workers: int | None,
          quiet: bool) -> None:
    """Score every image under DIRECTORY into OUT (CSV), one row per file.

    \b
    Columns: path (relative to DIRECTORY), status (ok/error), label, confidence,
    top_k (JSON), true_label, error, error_code, model_version.
    """
    try:
        code = run_score(directory, out, local=local, model=model, urls=list(urls), protocol=protocol,
                         host_header=host_header, token=token, key_file=key_file,
                         concurrency=concurrency, timeout=timeout, retries=retries, top_k=top_k,
                         labels_from_folders=labels_from_folders, resume=resume, device=device,
                         batch_size=batch_size, workers=workers, quiet=quiet)
    except BatchError as exc:
        click.echo(f"fruit-batch: error: {exc}", err=True)
        code = exc.exit_code
    sys.exit(code)


def _scorer(local: bool, model: str | None, urls: list[str], token: str | None, key_file: Path, concurrency: int,
            timeout: float, retries: int, top_k: int | None, device: str, batch_size: int, workers: int | None,
            protocol: str = "torchserve", host_header: str | None = None):
    if local:
        import torch
        from fruitserve.train.utils import select_device

        from .local import LocalScorer

        try:
            dev = select_device(device)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        # On CPU the forward pass already uses every core: decoding in the same process measured 15 % faster
        # than one DataLoader worker on 2 cores (BENCHMARKS.md). On CUDA, workers keep the GPU fed.
        n_workers = workers if workers is not None else (min(4, os.cpu_count() or 1) if dev.type == "cuda" else 0)
        return LocalScorer(Path(model or "model_store/fruit.mar"), dev, batch_size, n_workers, top_k,
                           threads=torch.get_num_threads())
    from fruitserve.model_store.server import read_tokens

    from .remote import RemoteScorer

    if token is None and key_file.is_file():
        try:
            token = read_tokens(key_file).get("inference")
        except (OSError, ValueError, KeyError) as exc:
            raise UsageError(f"cannot read a token from {key_file}: {exc}") from None
    return RemoteScorer(urls, model or "fruit", token, concurrency, timeout, retries=retries, top_k=top_k,
                        protocol=protocol, host_header=host_header)


def run_score(directory: Path, out: Path, *, local: bool, model: str | None, urls: list[str], token: str | None,
              key_file: Path, concurrency: int, timeout: float, retries: int, top_k: int | None,
              labels_from_folders: bool | None, resume: bool, device: str, batch_size: int, workers: int | None,
              quiet: bool, protocol: str = "torchserve", host_header: str | None = None) -> int:
    paths, ignored = find_images(directory)
    order = [p.as_posix() for p in paths]
    if local and protocol != "torchserve":
        raise UsageError("--protocol chooses how to call a server; it cannot be combined with --local")
    scorer = _scorer(local, model, urls, token, key_file, concurrency, timeout, retries, top_k, device, batch_size,
                     workers, protocol, host_header)
    try:
        writer = ResultWriter(out, order, resume)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    todo = [p for p in paths if p.as_posix() not in writer.done]
    stop = threading.Event()
    previous_sigterm = signal.signal(signal.SIGTERM, _interrupt)
    start = time.perf_counter()
    interrupted = unavailable = None
    bar = tqdm(total=len(todo), unit="img", desc="scoring", disable=quiet, file=sys.stderr, dynamic_ncols=True)
    scored = 0
    try:
        for result in scorer.score(directory, todo, stop):
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
        truth = _truth(writer.rows, paths, labels_from_folders, getattr(scorer, "labels", None))
        writer.finish()
        signal.signal(signal.SIGTERM, previous_sigterm)
    elapsed = time.perf_counter() - start
    rows = writer.rows
    _summarise(rows, order, truth, getattr(scorer, "labels", None), out, elapsed, scored, ignored)
    if interrupted:
        click.echo(f"fruit-batch: interrupted; {len(rows)}/{len(order)} rows in {out}. Rerun with --resume.", err=True)
        return 130
    if unavailable is not None:
        click.echo(f"fruit-batch: {unavailable}. {len(rows)}/{len(order)} rows in {out}; rerun with --resume.",
                   err=True)
        return ServerUnavailable.exit_code
    return 1 if any(r["status"] != "ok" for r in rows.values()) else 0


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM stops a run the way Ctrl-C does: what finished is kept and the CSV is rewritten cleanly."""
    raise KeyboardInterrupt


def _summarise(rows: dict[str, dict[str, str]], order: list[str], truth: dict[str, str], classes: list[str] | None,
               out: Path, elapsed: float, scored: int, ignored: int) -> None:
    ok = sum(r["status"] == "ok" for r in rows.values())
    failed = len(rows) - ok
    line = (f"{len(rows)}/{len(order)} files in {out}: {ok} ok, {failed} errors; {scored} scored this run in "
            f"{elapsed:.1f} s ({scored / max(elapsed, 1e-9):.1f} img/s)")
    if ignored:
        line += f"; {ignored} non-image files passed over"
    accuracy = _accuracy(rows, truth, classes) if truth else None
    if accuracy:
        line += f"; accuracy {accuracy[0]:.4f}, macro-F1 {accuracy[1]:.4f} on {accuracy[2]} labelled images"
    click.echo(line, err=True)


def _truth(rows: dict[str, dict[str, str]], paths: list[Path], labels_from_folders: bool | None,
           classes: list[str] | None) -> dict[str, str]:
    """True labels from folder names, written into ``rows``; auto-detected unless the flag says otherwise."""
    if labels_from_folders is False:
        return {}
    if labels_from_folders:
        classes = sorted({p.parts[0] for p in paths if len(p.parts) > 1})
    elif classes is None:  # server mode: every folder must be named like a label the server answered with
        classes = sorted({r["label"] for r in rows.values() if r["label"]})
    labels = folder_labels(paths, classes)
    if labels is None:
        if labels_from_folders:
            raise UsageError("--labels-from-folders: every file must sit under a folder named after a class")
        return {}
    for rel, name in labels.items():
        row = rows.get(rel.as_posix())
        if row is not None:
            row["true_label"] = name
    return {k.as_posix(): v for k, v in labels.items()}


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


__all__ = ["main", "COLUMNS"]
