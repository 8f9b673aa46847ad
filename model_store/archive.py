"""``fruit-archive``: package a training run into a versioned ``fruit.mar`` and optionally register it.

    fruit-archive runs/<run>                                  # -> model_store/fruit.mar (+ fruit-<version>.mar)
    fruit-archive runs/<run> --register http://127.0.0.1:8081 # also serve it as the new default version

The archive holds the TorchScript model, labels, metadata, ``model-config.yaml`` (batching and workers) and the
whole ``fruitserve.handler`` package (the handler, and the loading and preprocessing it shares with training and
``fruit-batch``), laid out as a package so that the handler imports it the same way inside and outside the archive.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import fruitserve.handler as handler_pkg
import requests
from fruitserve.handler.artifacts import FEATURE_STATS_FILE, LABELS_FILE, METADATA_FILE, MODEL_FILE, load_metadata, require_files
from fruitserve.handler.errors import ModelDirError

from .torchserve_process import read_tokens

HANDLER_DIR = Path(handler_pkg.__file__).resolve().parent
HANDLER_FILE = HANDLER_DIR / "fruit_handler.py"  # TorchServe's entry point, at the archive's root
HANDLER_PACKAGE = "fruitserve/handler"  # where the archive holds the package the handler imports
DEFAULT_CONFIG = Path(__file__).resolve().parent / "model-config.yaml"
DEFAULT_STORE = Path("model_store")
HTTP_TIMEOUT = 300  # registration loads the model and starts a worker synchronously


class RegistrationError(Exception):
    pass


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
        if (run_dir / FEATURE_STATS_FILE).is_file():
            extra.append(str(run_dir / FEATURE_STATS_FILE))
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


def register(management_url: str, archive: Path, model_name: str, version: str, token: str | None,
             workers: int = 1) -> str | None:
    """Register ``archive`` (already in the server's model store), make it the default, keep the old version.

    Returns the version that was the default before, for rollback.
    """
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    previous = None
    response = requests.get(f"{management_url}/models/{model_name}", headers=headers, timeout=30)
    if response.status_code == 200:
        entries = response.json()
        previous = next((e.get("modelVersion") for e in entries if e.get("isDefault") or len(entries) == 1), None)
    elif response.status_code in (401, 403):
        raise RegistrationError(f"management API refused the token ({response.status_code}): {response.text.strip()}")
    response = requests.post(
        f"{management_url}/models",
        params={"url": archive.name, "model_name": model_name, "initial_workers": workers, "synchronous": "true"},
        headers=headers, timeout=HTTP_TIMEOUT,
    )
    if response.status_code != 200:
        hint = " (is the server started with enable_model_api=true? `make serve MODEL_API=true`)" \
            if response.status_code in (403, 405) else ""
        raise RegistrationError(f"registering {archive.name} failed: {response.status_code} {response.text.strip()}{hint}")
    response = requests.put(f"{management_url}/models/{model_name}/{version}/set-default", headers=headers, timeout=30)
    if response.status_code != 200:
        raise RegistrationError(f"set-default {model_name}/{version} failed: {response.status_code} {response.text.strip()}")
    return previous


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fruit-archive", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="training run folder (model.pt, index_to_name.json, metadata.json)")
    parser.add_argument("--model-name", default="fruit")
    parser.add_argument("--version", help="archive version (default: model_version from metadata.json)")
    parser.add_argument("--export-path", type=Path, default=DEFAULT_STORE, help="the model store to write to")
    parser.add_argument("--config-file", type=Path, default=DEFAULT_CONFIG, help="model-config.yaml to pack")
    parser.add_argument("--register", metavar="MANAGEMENT_URL",
                        help="register the new version on this running server and make it the default")
    parser.add_argument("--token", default=os.environ.get("FRUIT_MANAGEMENT_TOKEN"),
                        help="management token (default: $FRUIT_MANAGEMENT_TOKEN, else --key-file)")
    parser.add_argument("--key-file", type=Path, default=Path("key_file.json"), help="TorchServe's key_file.json")
    args = parser.parse_args(argv)
    try:
        latest, versioned, version = build_archive(args.run_dir, args.export_path, args.model_name, args.version,
                                                   args.config_file)
        print(f"built {versioned} (version {version}) and {latest}")
        if args.register:
            token = args.token or (read_tokens(args.key_file).get("management") if args.key_file.is_file() else None)
            previous = register(args.register.rstrip("/"), versioned, args.model_name, version, token)
            print(f"registered {args.model_name} version {version} as the default on {args.register}")
            if previous and previous != version:
                print(f"previous version {previous} is still loaded: /predictions/{args.model_name}/{previous}; "
                      f"roll back with PUT {args.register}/models/{args.model_name}/{previous}/set-default")
    except ModelDirError as exc:
        print(f"fruit-archive: error: {exc}", file=sys.stderr)
        return 2
    except (RegistrationError, requests.RequestException, OSError, ValueError) as exc:
        print(f"fruit-archive: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
