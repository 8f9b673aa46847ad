"""``fruit-batch --engine ray``: the same scoring on a Ray cluster, with Ray Data.

The files to score go in as a dataset of paths (in the CSV's order); ``map_batches`` runs them through a pool of
actors, each of which loads the model once with the loader every other path uses (``load_classifier``) and
reads, decodes and scores its batches with ``local.decode`` and ``local.score_decoded``: the same rows as
``--local``. A file that cannot be read or decoded is that file's error row inside the actor, so no task fails
for it and no block is dropped (``max_errored_blocks`` stays 0). Rows stream back to the driver, whose writer
stays the one record of what is done: ``--resume`` skips what the CSV holds, and Ray Data's own checkpointing
(which can write a row twice after a crash) is not used.

The Ray driver runs in a child process. When the head node dies mid-job, Ray ends the driver's process
(``os._exit``, no Python exception); in a child, that becomes exit code 3 for the run, with the CSV whole.
Without ``--ray-address`` the child starts a local Ray on loopback, with token authentication on (a token made
for this run, in the environment only) and no dashboard; with it, the child joins that cluster, using the
token the cluster's clients use (``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN`` or ``RAY_AUTH_TOKEN_PATH``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import os
import queue
import secrets
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from fruitserve.handler.artifacts import LABELS_FILE, load_labels, model_dir

from .errors import ServerUnavailable, UsageError
from .results import Result
from .sources import Source

# Every Ray socket on loopback: without this Ray swaps 127.0.0.1 for the machine's outbound address.
LOOPBACK = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
QUIET = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_DEDUP_LOGS": "1"}
# A wrong or missing token is refused after RAY_gcs_server_port_wait_time_s (20 s by default): 5 s is plenty on
# loopback or a LAN, and a clear error sooner.
JOIN = {"RAY_gcs_server_port_wait_time_s": "5"}
# ...and a head that dies mid-job is noticed after this many seconds (60 by default)
RECONNECT = {"RAY_gcs_rpc_server_reconnect_timeout_s": "10"}
CONNECT_TIMEOUT = 5.0
_DONE = "done"


class ClusterUnavailable(ServerUnavailable):
    """The Ray cluster cannot be reached, or went away during the run (exit 3; ``--resume`` continues)."""


@dataclass(frozen=True)
class RayJob:
    """What the driver process needs: the model's bytes (so any node can load it), where the files are, how to
    spread the work, and how to score."""

    model: bytes
    model_suffix: str
    source: Source
    address: str | None
    workers: int | None  # None: one per CPU (or per gpus_per_worker GPUs) of the cluster
    gpus_per_worker: float
    batch_size: int
    precision: str
    top_k: int | None
    uncertainty: dict


class RayScorer:
    """The driver side: runs the Ray driver in a child process and yields its rows as they come."""

    def __init__(self, model: Path, options) -> None:
        if not model.is_file() and not model.is_dir():
            raise UsageError(f"no model at {model}")
        self.model_path = model
        self.options = options
        self.address = options.ray_address
        self.startup_seconds: float | None = None  # until the first rows: Ray, the actors, the model in each
        with model_dir(model) as folder:  # the classes, for the summary's accuracy; the actors load the model
            self.labels = load_labels(folder / LABELS_FILE)
        if self.address is not None:
            check_reachable(self.address)

    def score(self, source: Source, paths: list[str], stop: threading.Event) -> Iterator[Result]:
        if not paths:
            return
        o = self.options
        workers = o.workers or (os.cpu_count() or 1 if self.address is None else None)
        job = RayJob(_model_bytes(self.model_path), _model_suffix(self.model_path), source, self.address, workers,
                     o.gpus_per_worker, o.batch_size, o.precision, o.top_k, o.uncertainty)
        context = multiprocessing.get_context("spawn")
        rows = context.Queue(maxsize=64)
        driver = context.Process(target=drive, args=(job, paths, rows), name="fruit-batch-ray", daemon=True)
        driver.start()
        finished = False
        try:
            yield from self._rows(driver, rows, stop)
            finished = True
        finally:
            _stop(driver, finished)

    def _rows(self, driver, rows, stop: threading.Event) -> Iterator[Result]:
        start = time.perf_counter()
        while not stop.is_set():
            try:
                message = rows.get(timeout=0.5)
            except queue.Empty:
                if not driver.is_alive():  # gone without a word: Ray ended it (the head died)
                    raise ClusterUnavailable(f"the Ray driver ended (exit code {driver.exitcode}): the cluster went "
                                             "away during the run") from None
                continue
            kind, payload = message
            if kind == "rows":
                if self.startup_seconds is None:
                    self.startup_seconds = time.perf_counter() - start
                yield from (Result(**row) for row in payload)
            elif kind == "error":
                exit_code, text = payload
                raise (UsageError if exit_code == UsageError.exit_code else ClusterUnavailable)(text)
            elif kind == _DONE:
                return


def _stop(driver, finished: bool) -> None:
    """Let the driver shut its Ray down: on its own when the job finished, after a SIGINT when the run stopped
    early; then make sure it is gone."""
    if finished:
        driver.join(60)
    if driver.is_alive():
        with contextlib.suppress(ProcessLookupError):
            os.kill(driver.pid, signal.SIGINT)
        driver.join(30)
    if driver.is_alive():
        driver.kill()
        driver.join(10)


def check_reachable(address: str) -> None:
    """A closed port fails here at once; ``ray.init`` would retry it for many minutes."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not port.isdigit():
        raise UsageError(f"--ray-address {address!r}: expected HOST:PORT of the head's GCS (ray start --head --port)")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=CONNECT_TIMEOUT).close()
    except OSError as exc:
        raise ClusterUnavailable(f"cannot reach the Ray cluster at {address}: {exc}") from None


def _model_bytes(model: Path) -> bytes:
    if model.is_dir():  # a run folder: ship it as a .mar-like zip of the files the loader reads
        import io
        import zipfile

        from fruitserve.handler.artifacts import MODEL_FILES

        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as archive:
            for name in MODEL_FILES:
                if (model / name).is_file():
                    archive.write(model / name, name)
        return buffer.getvalue()
    return model.read_bytes()


def _model_suffix(model: Path) -> str:
    return ".mar" if model.is_dir() else model.suffix


# --- in the driver process -----------------------------------------------------------------------------------


def drive(job: RayJob, paths: list[str], rows) -> None:
    """Run the Ray Data job and send its rows to the parent; errors go as one message with their exit code."""
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C reaches this process too: the parent reports it
        _drive(job, paths, rows)


def _drive(job: RayJob, paths: list[str], rows) -> None:
    # a local Ray stays on loopback; joining a cluster takes the environment as its other clients have it (a
    # driver on loopback could not be reached by workers on other nodes)
    defaults = {**QUIET, **JOIN, **RECONNECT} | (LOOPBACK if job.address is None else {})
    os.environ.update({k: v for k, v in defaults.items() if k not in os.environ})
    if job.address is None:
        # a local cluster for this run only, with token authentication on and a token that lives in this process's
        # environment (nothing written to ~/.ray); set before Ray is imported, which reads it then
        os.environ.setdefault("RAY_AUTH_MODE", "token")
        if os.environ["RAY_AUTH_MODE"] == "token" and not (os.environ.get("RAY_AUTH_TOKEN")
                                                           or os.environ.get("RAY_AUTH_TOKEN_PATH")):
            os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    try:
        import ray
    except ImportError:
        rows.put(("error", (UsageError.exit_code, "--engine ray needs Ray: pip install 'fruitserve[ray]'")))
        return
    scratch = None if job.address else tempfile.mkdtemp(prefix="fruit-ray-", dir="/tmp" if os.path.isdir("/tmp") else None)
    try:
        _run(ray, job, paths, rows, scratch)
    finally:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)


def _run(ray, job: RayJob, paths: list[str], rows, scratch: str | None) -> None:
    try:
        _connect(ray, job, scratch)
    except Exception as exc:  # noqa: BLE001 - Ray raises ConnectionError, AuthenticationError, RuntimeError...
        auth = "auth" in type(exc).__name__.lower() or "token" in str(exc).lower()
        hint = (" (a cluster with token authentication: set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN, or "
                "RAY_AUTH_TOKEN_PATH, as its other clients do)") if auth or job.address else ""
        code = UsageError.exit_code if auth else ClusterUnavailable.exit_code
        rows.put(("error", (code, f"cannot start or join Ray ({type(exc).__name__}: {str(exc)[:300]}){hint}")))
        return
    try:
        model_ref = ray.put(job.model)
        for batch in _dataset(ray, job, paths, model_ref).iter_batches(batch_size=None, batch_format="numpy"):
            rows.put(("rows", [json.loads(row) for row in batch["row"]]))
        rows.put((_DONE, None))
    except Exception as exc:  # noqa: BLE001 - a failed job: the run stops, --resume continues it
        rows.put(("error", (ClusterUnavailable.exit_code, f"the Ray job failed: {type(exc).__name__}: "
                                                          f"{' '.join(str(exc).split())[:500]}")))
    finally:
        ray.shutdown()


def _connect(ray, job: RayJob, scratch: str | None) -> None:
    logging.getLogger("ray").setLevel(logging.ERROR)
    if job.address is not None:
        ray.init(address=job.address, log_to_driver=False, configure_logging=False)
        return
    # a local cluster for this run only: loopback (LOOPBACK, set by drive), no dashboard.
    # Ray's unix sockets live under the temporary folder and must stay under 108 bytes: a short one in /tmp
    ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, log_to_driver=False, configure_logging=False,
             _temp_dir=scratch)


def _dataset(ray, job: RayJob, paths: list[str], model_ref):
    from ray.data import ActorPoolStrategy, DataContext

    context = DataContext.get_current()
    context.execution_options.preserve_order = True  # rows come back in the CSV's order, after retries too
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    context.enable_auto_log_stats = False
    context.max_errored_blocks = 0  # a block that fails fails the job: never a silently missing row
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    workers = job.workers or _cluster_workers(ray, job.gpus_per_worker)
    # a block per batch, and at least one per actor, so that every actor gets work
    blocks = min(max(-(-len(paths) // job.batch_size), min(workers, len(paths))), 10_000)
    dataset = ray.data.from_items([{"path": p} for p in paths], override_num_blocks=blocks)
    return dataset.map_batches(
        RayWorker, fn_constructor_kwargs={"job": _without_model(job), "model_ref": model_ref},
        compute=ActorPoolStrategy(size=workers), batch_size=job.batch_size, batch_format="numpy",
        num_cpus=1, num_gpus=job.gpus_per_worker or None)


def _cluster_workers(ray, gpus_per_worker: float) -> int:
    """One actor per CPU of the cluster, or per ``gpus_per_worker`` of its GPUs."""
    resources = ray.cluster_resources()
    if gpus_per_worker:
        return max(1, int(resources.get("GPU", 0) / gpus_per_worker))
    return max(1, int(resources.get("CPU", 1)))


def _without_model(job: RayJob) -> dict:
    return {k: v for k, v in asdict(job).items() if k != "model"} | {"source": job.source}


class RayWorker:
    """One Ray actor: the model loaded once, then batches of paths to rows (JSON, one per file)."""

    def __init__(self, job: dict, model_ref) -> None:
        import ray
        import torch
        from fruitserve.handler.classifier import load_classifier
        from fruitserve.handler.predictions import clamp_top_k

        model = ray.get(model_ref)
        device = "cuda" if job["gpus_per_worker"] and torch.cuda.is_available() else "cpu"
        if device == "cpu":
            torch.set_num_threads(1)  # one core per actor: the pool has as many actors as it has cores
        with tempfile.TemporaryDirectory(prefix="fruit-ray-model-") as scratch:
            path = Path(scratch) / f"model{job['model_suffix']}"
            path.write_bytes(model)
            self.classifier = load_classifier(path, device=device, precision=job["precision"],
                                              max_batch=job["batch_size"], uncertainty=job["uncertainty"])
        self.source = job["source"]
        self.k = clamp_top_k(job["top_k"], len(self.classifier.labels))
        # objects in a store: the reads of a batch overlap (local files: one after the other, the core is busy)
        from concurrent.futures import ThreadPoolExecutor

        from .local import READ_THREADS
        from .sources import RemoteFolder

        self.pool = ThreadPoolExecutor(READ_THREADS) if isinstance(self.source, RemoteFolder) else None

    def __call__(self, batch: dict) -> dict:
        from .local import decode_batch, score_decoded

        items = decode_batch(self.source, [str(p) for p in batch["path"]], self.classifier.config, self.pool)
        return {"row": [json.dumps(asdict(r)) for r in score_decoded(self.classifier, items, self.k)]}
