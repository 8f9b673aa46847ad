"""The MLflow model registry, seen from packaging: fetch a registered version's files, move an alias.

``models:/fruit@candidate`` and ``models:/fruit/7`` name a version of the registered model ``fruit`` (see
``fruitserve.train.tracking``, which registers every tracked training run). Its files are the run folder's:
``model.pt``, ``index_to_name.json``, ``metadata.json`` and the rest, so ``build_archive`` packs them as it
packs a run folder.
"""

from __future__ import annotations

import contextlib
import json
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

from fruitserve.handler.artifacts import METADATA_FILE, require_files
from fruitserve.handler.errors import ModelDirError

REFERENCE = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")


def is_reference(source: str) -> bool:
    return source.startswith("models:/")


def tracking_uri_for(explicit: str | None, metadata: dict | None = None) -> str | None:
    """The store to use: the one given, else ``$MLFLOW_TRACKING_URI``, else the one the run was tracked in."""
    import os

    return explicit or os.environ.get("MLFLOW_TRACKING_URI") or ((metadata or {}).get("tracking") or {}).get("uri")


@contextlib.contextmanager
def fetched(reference: str, tracking_uri: str | None) -> Iterator[Path]:
    """The files of a registered version in a temporary folder, its ``metadata.json`` naming the version
    (``registry``), so the archive built from them knows which registry version it serves."""
    from fruitserve.train.tracking import client_for

    match = REFERENCE.match(reference)
    if match is None:
        raise ModelDirError(f"{reference!r} is not a registry reference: use models:/NAME@ALIAS or models:/NAME/VERSION")
    if not tracking_uri:
        raise ModelDirError(f"{reference}: no tracking store to fetch it from (--tracking-uri or MLFLOW_TRACKING_URI)")
    mlflow, client = client_for(tracking_uri)
    name = match["name"]
    with tempfile.TemporaryDirectory(prefix="fruit-registry-") as tmp:
        try:
            entry = (client.get_model_version_by_alias(name, match["alias"]) if match["alias"]
                     else client.get_model_version(name, match["version"]))
            folder = Path(_download(mlflow, client, entry.source, tmp, tracking_uri))
        except Exception as exc:  # noqa: BLE001 - MLflow's errors: no such model, alias or version; store gone
            raise ModelDirError(f"cannot fetch {reference} from {tracking_uri}: "
                                f"{' '.join(str(exc).split())[:300]}") from None
        require_files(folder, f"the files of {reference} (version {entry.version})")
        metadata = json.loads((folder / METADATA_FILE).read_text(encoding="utf-8"))
        metadata["registry"] = {"name": name, "version": str(entry.version), "run_id": entry.run_id,
                                "tracking_uri": tracking_uri}
        (folder / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
        yield folder


def _download(mlflow, client, source: str, destination: str, tracking_uri: str) -> str:
    """A version's files, from the store ``client`` talks to (``mlflow.artifacts`` would resolve a ``models:/`` or
    ``runs:/`` URI with the process-wide URIs instead)."""
    if source.startswith("runs:/"):
        run_id, _, path = source.removeprefix("runs:/").partition("/")
        return client.download_artifacts(run_id, path, destination)
    return mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=destination, tracking_uri=tracking_uri)


def move_alias(tracking_uri: str, name: str, alias: str, version: str) -> None:
    """Point ``alias`` at ``version`` of registered model ``name``."""
    from fruitserve.train.tracking import client_for

    mlflow, client = client_for(tracking_uri)
    client.set_registered_model_alias(name, alias, str(version))


def registry_of(metadata: dict) -> dict | None:
    """``{"name", "version", "tracking_uri"}`` of the registry version a model's metadata says it is, if any."""
    registry = metadata.get("registry")
    if not registry or not registry.get("version"):
        return None
    uri = registry.get("tracking_uri") or (metadata.get("tracking") or {}).get("uri")
    return {"name": registry.get("name", "fruit"), "version": str(registry["version"]), "tracking_uri": uri}
