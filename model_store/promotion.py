"""The promotion gate: a new version becomes the default only if it is not worse than what the server serves.

What the server serves is read from the server: the management API says which version is the default and
which archive it came from (``modelUrl``); that archive's ``metadata.json`` (in the server's model store) holds
its Test metrics and ``index_to_name.json`` its classes. A candidate worse by more than the tolerance, or with
another class list, is refused unless forced. Each promotion is recorded in ``<store>/<name>.history.json``,
so that ``--rollback`` can make the previous default the default again.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

import requests
from fruitserve.handler.artifacts import LABELS_FILE, METADATA_FILE, load_labels, load_metadata

from .registry import registry_of

HTTP_TIMEOUT = 30
METRICS = ("top1", "macro_f1")


class RegistrationError(Exception):
    """The server refused a registration, a set-default or the token, or cannot be read."""


class PromotionRefused(Exception):
    """The gate said no: the candidate is worse than the served default, or classifies other classes."""


@dataclass
class ModelFacts:
    """What the gate compares: a version, its metrics on one split, its classes, and its registry version."""

    version: str
    split: str | None
    metrics: dict[str, float]
    labels: list[str]
    metadata: dict

    @classmethod
    def from_metadata(cls, metadata: dict, labels: list[str]) -> ModelFacts:
        # Test when the run had one (fruit-train reports it once, after training), else validation
        summaries = metadata.get("metrics") or {}
        split = next((s for s in ("test", "validation") if s in summaries), None)
        metrics = {k: float(summaries[split][k]) for k in METRICS if split and k in summaries[split]}
        return cls(str(metadata.get("model_version")), split, metrics, labels, metadata)

    @classmethod
    def from_run(cls, folder: Path) -> ModelFacts:
        return cls.from_metadata(load_metadata(folder / METADATA_FILE), load_labels(folder / LABELS_FILE))

    @classmethod
    def from_archive(cls, archive: Path) -> ModelFacts:
        with zipfile.ZipFile(archive) as mar:
            metadata = json.loads(mar.read(METADATA_FILE))
            mapping = json.loads(mar.read(LABELS_FILE))
        return cls.from_metadata(metadata, [mapping[str(i)] for i in range(len(mapping))])

    def describe(self) -> str:
        figures = ", ".join(f"{k} {v:.4f}" for k, v in self.metrics.items()) or "no metrics"
        return f"version {self.version} ({self.split or 'no'} split: {figures})"


class ManagementAPI:
    """The few calls of TorchServe's management API that packaging needs, with timeouts and the token."""

    def __init__(self, url: str, token: str | None) -> None:
        self.url = url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}

    def _call(self, method: str, path: str, timeout: float = HTTP_TIMEOUT, **kwargs: object) -> requests.Response:
        response = requests.request(method, f"{self.url}{path}", headers=self.headers, timeout=timeout, **kwargs)
        if response.status_code in (401, 403) and "token" in response.text.lower():
            raise RegistrationError(f"management API refused the token ({response.status_code}): "
                                    f"{response.text.strip()[:200]}")
        return response

    def _describe(self, path: str) -> list[dict]:
        response = self._call("GET", path)
        if response.status_code == 404:
            return []
        if response.status_code != 200:
            raise RegistrationError(f"GET {path} failed: {response.status_code} {response.text.strip()[:200]}")
        return response.json()

    def versions(self, name: str) -> list[dict]:
        """Every loaded version of ``name`` (empty when the server has none)."""
        return self._describe(f"/models/{name}/all")

    def default(self, name: str) -> dict | None:
        """The version the server answers ``/predictions/<name>`` with (TorchServe describes only it here)."""
        entries = self._describe(f"/models/{name}")
        return entries[0] if entries else None

    def register(self, archive_name: str, name: str, timeout: float, workers: int = 1) -> None:
        response = self._call("POST", "/models", timeout=timeout, params={
            "url": archive_name, "model_name": name, "initial_workers": workers, "synchronous": "true"})
        if response.status_code != 200:
            hint = (" (is the server started with enable_model_api=true? `make serve MODEL_API=true`)"
                    if response.status_code in (403, 405) else "")
            raise RegistrationError(f"registering {archive_name} failed: {response.status_code} "
                                    f"{response.text.strip()[:300]}{hint}")

    def set_default(self, name: str, version: str) -> None:
        response = self._call("PUT", f"/models/{name}/{version}/set-default")
        if response.status_code != 200:
            raise RegistrationError(f"set-default {name}/{version} failed: {response.status_code} "
                                    f"{response.text.strip()[:300]}")


def served_default(api: ManagementAPI, name: str, store: Path) -> ModelFacts | None:
    """The facts of the version the server serves as ``name``'s default, from the archive it was loaded from."""
    entry = api.default(name)
    if entry is None:
        return None
    archive = store / str(entry.get("modelUrl", ""))
    version = str(entry.get("modelVersion"))
    if not archive.is_file():
        raise PromotionRefused(f"the server serves {name} version {version} from {entry.get('modelUrl')!r}, which is "
                               f"not in {store}: point --export-path at the server's model store (or --force)")
    facts = ModelFacts.from_archive(archive)
    if facts.version != version:
        raise PromotionRefused(f"{archive} now holds version {facts.version}, not the served {version}: the served "
                               f"version's metrics cannot be read (--force to register anyway)")
    return facts


def gate(candidate: ModelFacts, served: ModelFacts | None, tolerance_points: float) -> list[str]:
    """Why ``candidate`` must not replace ``served`` (empty: it may)."""
    if served is None:
        return []
    reasons = []
    if candidate.labels != served.labels:
        added, removed = set(candidate.labels) - set(served.labels), set(served.labels) - set(candidate.labels)
        reasons.append(f"its class list differs from the served one ({len(candidate.labels)} vs {len(served.labels)} "
                       f"classes; new: {sorted(added)[:5]}, gone: {sorted(removed)[:5]}, or another order)")
    if candidate.split != served.split or not candidate.metrics or not served.metrics:
        reasons.append(f"their metrics cannot be compared: {candidate.describe()} against {served.describe()}")
        return reasons
    for key in METRICS:
        drop = (served.metrics[key] - candidate.metrics[key]) * 100
        if drop > tolerance_points:
            reasons.append(f"{key} {candidate.metrics[key]:.4f} is {drop:.2f} points below the served "
                           f"{served.metrics[key]:.4f} (tolerance {tolerance_points} points)")
    return reasons


class History:
    """Promotions of one model, oldest first, in ``<store>/<name>.history.json``: what ``--rollback`` undoes."""

    def __init__(self, store: Path, name: str) -> None:
        self.path = store / f"{name}.history.json"

    def load(self) -> list[dict]:
        return json.loads(self.path.read_text(encoding="utf-8")) if self.path.is_file() else []

    def save(self, entries: list[dict]) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(entries, indent=2) + "\n", encoding="utf-8")
        tmp.replace(self.path)

    def promoted(self, previous: ModelFacts | None, new: ModelFacts) -> None:
        entries = self.load()
        if previous is not None and (not entries or entries[-1]["version"] != previous.version):
            entries.append(_entry(previous))  # the default the server had before the first promotion
        entries.append(_entry(new))
        self.save(entries)


def _entry(facts: ModelFacts) -> dict:
    return {"version": facts.version, "registry": registry_of(facts.metadata), "metrics": facts.metrics}
