"""Experiment tracking and the model registry, in MLflow.

Each ``fruit-train train`` run becomes an MLflow run: every argument as a param, per-epoch training and
validation metrics, the final metrics, provenance tags, and the run folder's files as artifacts under
``model/``. Its model is registered as a new version of the registered model ``fruit`` with the alias
``candidate``; ``fruit-archive --register`` moves ``champion`` when a version goes live.

The run folder stays the source of truth: MLflow gets copies, and the run's id goes into ``metadata.json``.
A tracking server that cannot be reached when training starts is an error before any training; one that
goes away during the run costs a warning and the rest of that run's logging, never the training.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("fruit-train")

REGISTERED_MODEL = "fruit"
CANDIDATE = "candidate"
CHAMPION = "champion"
ARTIFACT_PATH = "model"
EXPERIMENT = "fruitserve"
# Training state, not the model: large, and of no use to anyone who loads a registered version.
NOT_LOGGED = {"checkpoint.pt", "best.pt"}
# MLflow retries a failed request 7 times with backoff (about four minutes) and waits 120 s for an answer by
# default: a tracking server that went away would stall every epoch. A few seconds at most, unless the user set
# these. Read by MLflow at every request, so they must be set before the first one.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
QUIET_DEFAULTS = {"MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
                  "GIT_PYTHON_REFRESH": "quiet"}


class TrackingError(Exception):
    """The tracking store cannot be used at all (unreachable at start, or MLflow missing when it was asked for)."""


def default_tracking_uri(output_dir: Path) -> str:
    """A local SQLite store beside the runs folder: ``mlflow ui --backend-store-uri`` browses it."""
    return f"sqlite:///{(Path(output_dir).resolve().parent / 'mlflow.db').as_posix()}"


def resolve_tracking_uri(explicit: str | None, output_dir: Path) -> str:
    return explicit or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(output_dir)


def local_artifact_location(uri: str) -> str | None:
    """For a SQLite store, artifacts beside the database (``mlartifacts/``), not in ``./mlruns`` of whatever
    folder training started in; a tracking server decides for itself (None)."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()


def import_mlflow():
    """MLflow, quiet and with short network timeouts; ``TrackingError`` when the extra is not installed."""
    for key, value in {**HTTP_DEFAULTS, **QUIET_DEFAULTS}.items():
        os.environ.setdefault(key, value)
    try:
        import mlflow
    except ImportError:
        raise TrackingError("MLflow is not installed (pip install 'fruitserve[tracking]')") from None
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    return mlflow


def client_for(uri: str):
    """An MlflowClient for ``uri`` that has answered once: an unreachable store is a ``TrackingError`` now."""
    mlflow = import_mlflow()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    try:
        client.search_experiments(max_results=1)
    except Exception as exc:  # noqa: BLE001 - MLflow raises MlflowException, requests' and SQLAlchemy's errors
        raise TrackingError(f"tracking store {uri} cannot be reached: {_short(exc)}") from None
    return mlflow, client


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}"


@dataclass
class Registered:
    name: str
    version: str


class Tracker:
    """One training run's MLflow run. Every call after the start is best effort: the first failure logs one
    warning and turns the tracker off, so a tracking server that goes away never stops the training."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.mlflow, self.client = client_for(uri)
        self.run_id: str | None = None
        self.active = True

    def start(self, run_name: str, params: Mapping[str, object], tags: Mapping[str, str],
              resume_run_id: str | None = None) -> str | None:
        """Open (or, on ``--resume``, reopen) the MLflow run; its id, or None if tracking has just turned off."""
        def begin() -> str:
            if resume_run_id:
                self.client.update_run(resume_run_id, status="RUNNING")
                return resume_run_id
            experiment = self.client.get_experiment_by_name(EXPERIMENT)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(
                EXPERIMENT, artifact_location=local_artifact_location(self.uri))
            run = self.client.create_run(experiment_id, run_name=run_name, tags=dict(tags))
            self.client.log_batch(run.info.run_id, params=[self._param(k, v) for k, v in params.items()])
            return run.info.run_id

        self.run_id = self._safely("start the run", begin)
        return self.run_id

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if self.run_id is None:
            return
        from mlflow.entities import Metric

        timestamp = _now_ms()
        batch = [Metric(k, float(v), timestamp, step or 0) for k, v in metrics.items() if v is not None]
        self._safely("log metrics", lambda: self.client.log_batch(self.run_id, metrics=batch))

    def finish(self, run_dir: Path, register: bool = True) -> Registered | None:
        """Upload the run folder as artifacts, close the run, register its model as a ``candidate``."""
        if self.run_id is None:
            return None

        def upload() -> bool:
            for path in sorted(run_dir.iterdir()):
                if path.is_file() and path.name not in NOT_LOGGED and not path.name.endswith(".tmp"):
                    self.client.log_artifact(self.run_id, str(path), ARTIFACT_PATH)
            self.client.set_terminated(self.run_id, "FINISHED")
            return True

        if not self._safely("upload the run's files", upload) or not register:
            return None

        def register_version() -> Registered:
            from mlflow.exceptions import MlflowException

            try:
                self.client.create_registered_model(REGISTERED_MODEL)
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
            version = self.client.create_model_version(REGISTERED_MODEL, f"runs:/{self.run_id}/{ARTIFACT_PATH}",
                                                       run_id=self.run_id)
            self.client.set_registered_model_alias(REGISTERED_MODEL, CANDIDATE, str(version.version))
            return Registered(REGISTERED_MODEL, str(version.version))

        return self._safely("register the model", register_version)

    def fail(self, status: str = "FAILED") -> None:
        """Close the run as FAILED (an error ended the training) or KILLED (Ctrl-C; ``--resume`` reopens it)."""
        if self.run_id is not None:
            self._safely("close the run", lambda: self.client.set_terminated(self.run_id, status))

    def _safely(self, what: str, call):
        """``call()``, or None once tracking has failed (this time or before)."""
        if not self.active:
            return None
        try:
            return call()
        except Exception as exc:  # noqa: BLE001 - a tracking failure must never cost the training
            self.active = False
            log.warning("MLflow tracking at %s stopped: could not %s (%s); training goes on, the rest of this "
                        "run is not logged", self.uri, what, _short(exc))
            return None

    @staticmethod
    def _param(key: str, value: object):
        from mlflow.entities import Param

        return Param(key, str(value)[:6000])


class NoTracker:
    """``--no-tracking``, or MLflow not installed: the same calls, doing nothing."""

    uri = None
    run_id = None

    def start(self, *args: object, **kwargs: object) -> None:
        return None

    def log_metrics(self, *args: object, **kwargs: object) -> None:
        return None

    def finish(self, *args: object, **kwargs: object) -> None:
        return None

    def fail(self, status: str = "FAILED") -> None:
        return None


def start_tracking(uri: str | None, enabled: bool) -> Tracker | NoTracker:
    """The tracker for a training run: ``TrackingError`` (exit 2, before any training) when the store cannot be
    reached; tracking off, with one line saying why, when it is turned off or MLflow is not installed."""
    if not enabled:
        log.info("experiment tracking off (--no-tracking)")
        return NoTracker()
    try:
        import mlflow  # noqa: F401
    except ImportError:
        log.info("experiment tracking off: MLflow is not installed (pip install 'fruitserve[tracking]')")
        return NoTracker()
    tracker = Tracker(uri)
    log.info("tracking this run in MLflow at %s", uri)
    return tracker


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)
