"""``fruit-archive``: package a training run into a versioned ``fruit.mar`` and optionally register it.

    fruit-archive runs/<run>                                  # -> model_store/fruit.mar (+ fruit-<version>.mar)
    fruit-archive models:/fruit@candidate                     # the same, from the MLflow model registry
    fruit-archive runs/<run> --register http://127.0.0.1:8081 # serve it as the new default, if not worse
    fruit-archive --rollback http://127.0.0.1:8081            # the previous default again

The archive holds the TorchScript model, labels, metadata, ``model-config.yaml`` (batching and workers) and the
whole ``fruitserve.handler`` package (the handler, and the loading and preprocessing it shares with training and
``fruit-batch``), laid out as a package so that the handler imports it the same way inside and outside the archive.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import fruitserve.handler as handler_pkg
import requests
from fruitserve.handler.artifacts import (
    FEATURE_STATS_FILE,
    INT8_MODEL_FILE,
    LABELS_FILE,
    METADATA_FILE,
    MODEL_FILE,
    load_metadata,
    require_files,
)
from fruitserve.handler.errors import ModelDirError
from fruitserve.train.tracking import CHAMPION, TrackingError

from .promotion import History, ManagementAPI, ModelFacts, PromotionRefused, RegistrationError, gate, served_default
from .registry import fetched, is_reference, move_alias, registry_of, tracking_uri_for
from .torchserve_process import read_tokens

HANDLER_DIR = Path(handler_pkg.__file__).resolve().parent
HANDLER_FILE = HANDLER_DIR / "fruit_handler.py"  # TorchServe's entry point, at the archive's root
HANDLER_PACKAGE = "fruitserve/handler"  # where the archive holds the package the handler imports
DEFAULT_CONFIG = Path(__file__).resolve().parent / "model-config.yaml"
DEFAULT_STORE = Path("model_store")
HTTP_TIMEOUT = 300  # registration loads the model and starts a worker synchronously


def build_archive(run_dir: Path, export_path: Path, model_name: str = "fruit", version: str | None = None,
                  config_file: Path = DEFAULT_CONFIG) -> tuple[Path, Path, str]:
    """Write ``<name>-<version>.mar`` and refresh ``<name>.mar``, both atomically. Returns both paths and the version."""
    require_files(run_dir, "a complete training run")
    version = version or str(load_metadata(run_dir / METADATA_FILE).get("model_version") or "")
    if not version:
        raise ModelDirError(f"{run_dir / METADATA_FILE} has no model_version; pass --version")
    export_path.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=export_path, prefix=".build-") as tmp:
        # torch-model-archiver copies what a folder in --extra-files holds to the archive's root: a folder holding
        # fruitserve/handler/ puts the package there, next to the entry point
        package_root = Path(tmp) / "package"
        shutil.copytree(HANDLER_DIR, package_root / HANDLER_PACKAGE, ignore=shutil.ignore_patterns("__pycache__"))
        extra = [str(run_dir / LABELS_FILE), str(run_dir / METADATA_FILE), str(package_root)]
        extra += [str(run_dir / name) for name in (FEATURE_STATS_FILE, INT8_MODEL_FILE) if (run_dir / name).is_file()]
        cmd = [*archiver_command(), "--model-name", model_name, "--version", version,
               "--serialized-file", str(run_dir / MODEL_FILE), "--handler", str(HANDLER_FILE),
               "--extra-files", ",".join(extra), "--config-file", str(config_file),
               "--export-path", tmp, "--force"]
        # torch-model-archiver stages the files in $TMPDIR/<model_name>, a path shared by every build of the
        # same name: two builds at once (CI jobs, a retrain while tests run) would pack each other's files.
        staging = Path(tmp) / "staging"
        staging.mkdir()
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                                env=os.environ | {"TMPDIR": str(staging)})
        built = Path(tmp) / f"{model_name}.mar"
        if result.returncode != 0 or not built.is_file():
            raise ModelDirError(f"torch-model-archiver failed ({result.returncode}): {result.stderr.strip()[-2000:]}")
        versioned = export_path / f"{model_name}-{version}.mar"
        latest = export_path / f"{model_name}.mar"
        shutil.copyfile(built, Path(tmp) / "latest.mar")
        os.replace(built, versioned)
        os.replace(Path(tmp) / "latest.mar", latest)
    return latest, versioned, version


def archiver_command() -> list[str]:
    """torch-model-archiver from this Python's environment (a venv's bin/ need not be on PATH)."""
    return [shutil.which("torch-model-archiver", path=str(Path(sys.executable).parent)) or "torch-model-archiver"]


def promote(api: ManagementAPI, args: argparse.Namespace, source: Path, store: Path) -> int:
    """Build, gate against the server's default, register, make default, move ``champion``, record the history."""
    candidate = ModelFacts.from_run(source)
    served = None
    try:
        served = served_default(api, args.model_name, store)
        reasons = gate(candidate, served, args.tolerance)
    except PromotionRefused as exc:
        reasons = [str(exc)]
    if served is not None:
        print(f"served default: {served.describe()}")
    print(f"candidate:      {candidate.describe()}")
    if reasons and not args.force:
        for reason in reasons:
            print(f"fruit-archive: refused: {reason}", file=sys.stderr)
        print("fruit-archive: the served default stays; --force registers it anyway", file=sys.stderr)
        return 1
    if reasons:
        print(f"fruit-archive: --force: registering despite: {'; '.join(reasons)}", file=sys.stderr)
    _, versioned, version = build_archive(source, store, args.model_name, args.version, args.config_file)
    print(f"built {versioned} (version {version})")
    api.register(versioned.name, args.model_name, HTTP_TIMEOUT)
    api.set_default(args.model_name, version)
    print(f"registered {args.model_name} version {version} as the default on {api.url}")
    History(store, args.model_name).promoted(served, candidate)
    _move_champion(registry_of(candidate.metadata), args.tracking_uri)
    if served is not None and served.version != version:
        print(f"previous default {served.version} is still loaded (/predictions/{args.model_name}/{served.version}); "
              f"fruit-archive --rollback {api.url} makes it the default again")
    return 0


def rollback(api: ManagementAPI, args: argparse.Namespace, store: Path) -> int:
    """Make the default before the last promotion the default again, and move ``champion`` back with it."""
    history = History(store, args.model_name)
    entries = history.load()
    if len(entries) < 2:
        raise PromotionRefused(f"no earlier default of {args.model_name} recorded in {history.path}: nothing to roll "
                               "back to")
    current, previous = entries[-1], entries[-2]
    loaded = {str(e.get("modelVersion")) for e in api.versions(args.model_name)}
    if previous["version"] not in loaded:
        raise PromotionRefused(f"version {previous['version']} is no longer loaded on {api.url}: register its archive "
                               f"again (fruit-archive RUN --register {api.url})")
    api.set_default(args.model_name, previous["version"])
    history.save(entries[:-1])
    print(f"rolled back {args.model_name}: default {current['version']} -> {previous['version']} on {api.url}")
    _move_champion(previous.get("registry"), args.tracking_uri)
    return 0


def _move_champion(registry: dict | None, tracking_uri: str | None) -> None:
    """Point the registry alias ``champion`` at the version now served, when the model came from the registry."""
    if registry is None:
        return
    uri = tracking_uri or registry["tracking_uri"]
    try:
        move_alias(uri, registry["name"], CHAMPION, registry["version"])
    except TrackingError as exc:
        print(f"fruit-archive: warning: served, but the alias '{CHAMPION}' was not moved: {exc}", file=sys.stderr)
        return
    print(f"registry {uri}: {registry['name']}@{CHAMPION} -> version {registry['version']}")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fruit-archive", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", nargs="?", help="a training run folder, or a registry reference "
                                                  "(models:/fruit@candidate, models:/fruit/7)")
    parser.add_argument("--model-name", default="fruit")
    parser.add_argument("--version", help="archive version (default: model_version from metadata.json)")
    parser.add_argument("--export-path", type=Path, default=DEFAULT_STORE,
                        help="the model store to write to (with --register or --rollback: the server's)")
    parser.add_argument("--config-file", type=Path, default=DEFAULT_CONFIG, help="model-config.yaml to pack")
    parser.add_argument("--register", metavar="MANAGEMENT_URL",
                        help="register the new version on this running server and make it the default, if it is "
                             "not worse than the default it serves now")
    parser.add_argument("--tolerance", type=float, default=0.1,
                        help="with --register: how many points of Test top-1 or macro-F1 the new version may lose")
    parser.add_argument("--force", action="store_true", help="with --register: register even when the gate refuses")
    parser.add_argument("--rollback", metavar="MANAGEMENT_URL",
                        help="make the default before the last promotion the default again (and move 'champion')")
    parser.add_argument("--tracking-uri", help="MLflow store for models:/ references and the aliases "
                                               "(default: $MLFLOW_TRACKING_URI, else the one the run was tracked in)")
    parser.add_argument("--token", default=os.environ.get("FRUIT_MANAGEMENT_TOKEN"),
                        help="management token (default: $FRUIT_MANAGEMENT_TOKEN, else --key-file)")
    parser.add_argument("--key-file", type=Path, default=Path("key_file.json"), help="TorchServe's key_file.json")
    return parser


@contextlib.contextmanager
def source_folder(source: str, tracking_uri: str | None) -> Iterator[Path]:
    """A run folder as it is, or a registry reference's files fetched into a temporary folder."""
    if is_reference(source):
        with fetched(source, tracking_uri_for(tracking_uri)) as folder:
            yield folder
    else:
        yield require_files(Path(source), "a complete training run")


def run(args: argparse.Namespace) -> int:
    management = args.register or args.rollback
    token = args.token or (read_tokens(args.key_file).get("management") if args.key_file.is_file() else None)
    api = ManagementAPI(management, token) if management else None
    if args.rollback:
        return rollback(api, args, args.export_path)
    if not args.source:
        raise ModelDirError("give a run folder or a models:/ reference (or --rollback URL)")
    with source_folder(args.source, args.tracking_uri) as folder:
        if api is not None:
            return promote(api, args, folder, args.export_path)
        latest, versioned, version = build_archive(folder, args.export_path, args.model_name, args.version,
                                                   args.config_file)
        print(f"built {versioned} (version {version}) and {latest}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """The one place that turns errors into exit codes: 2 unusable input, 1 refused or failed."""
    args = get_args_parser().parse_args(argv)
    try:
        return run(args)
    except (ModelDirError, TrackingError) as exc:
        print(f"fruit-archive: error: {exc}", file=sys.stderr)
        return 2
    except (PromotionRefused, RegistrationError, requests.RequestException, OSError, ValueError) as exc:
        print(f"fruit-archive: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
