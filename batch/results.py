"""The CSV that ``fruit-batch`` writes: one row per file, flushed as results arrive, never half a row.

Rows are appended to OUT.csv as each file finishes, so a killed run leaves a valid CSV
of what finished. When the run ends (or on ``--resume``) the file is rewritten in walk
order, without duplicates, through a temporary file and an atomic rename.
"""

from __future__ import annotations

import csv
import fcntl
import io
import json
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

COLUMNS = ("path", "status", "label", "confidence", "uncertain", "ood_score", "top_k", "true_label", "error",
           "error_code", "model_version", "precision")


@dataclass
class Result:
    path: str
    status: str  # "ok" or "error"
    label: str = ""
    confidence: float | None = None
    uncertain: bool | None = None
    ood_score: float | None = None
    top_k: list[dict] = field(default_factory=list)
    true_label: str = ""
    error: str = ""
    error_code: int | None = None
    model_version: str = ""
    precision: str = ""

    @classmethod
    def ok(cls, path: str, prediction: dict) -> Result:
        score = prediction.get("ood_score")
        return cls(path, "ok", prediction["label"], prediction["confidence"], bool(prediction.get("uncertain")),
                   None if score is None else float(score),
                   [{"label": t["label"], "probability": round(t["probability"], 6)} for t in prediction["top_k"]],
                   model_version=str(prediction.get("model_version") or ""),
                   precision=str(prediction.get("precision") or ""))

    @classmethod
    def failed(cls, path: str, error: str, code: int | None = None) -> Result:
        return cls(path, "error", error=error, error_code=code)

    def row(self) -> dict[str, str]:
        return {
            "path": self.path, "status": self.status, "label": self.label,
            "confidence": "" if self.confidence is None else f"{self.confidence:.6f}",
            "uncertain": "" if self.uncertain is None else str(self.uncertain).lower(),
            "ood_score": "" if self.ood_score is None else f"{self.ood_score:.5f}",
            "top_k": json.dumps(self.top_k, separators=(",", ":")) if self.top_k else "",
            "true_label": self.true_label, "error": " ".join(self.error.split()),  # one physical line per row
            "error_code": "" if self.error_code is None else str(self.error_code),
            "model_version": self.model_version, "precision": self.precision,
        }


def _line(row: dict[str, str]) -> str:
    buffer = io.StringIO()
    csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n").writerow(row)
    return buffer.getvalue()


def read_rows(path: Path) -> dict[str, dict[str, str]]:
    """Complete rows of an existing OUT.csv by path; a torn last line from a killed run is dropped."""
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8", newline="") as handle:
        text = handle.read()
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if reader.fieldnames is None or tuple(reader.fieldnames) != COLUMNS:
        if not text.strip():
            return {}
        raise ValueError(f"{path} is not a fruit-batch CSV (columns {reader.fieldnames})")
    return {row["path"]: row for row in reader if row.get("path") and row.get("status") in ("ok", "error")}


class OutputInUse(Exception):
    """Another process is writing the same OUT.csv."""


class OutputLock:
    """An exclusive lock on ``.OUT.csv.lock`` beside the CSV, held for the whole run.

    ``flock`` is released by the kernel when the holder dies, however it dies, so a killed run never leaves a
    stale lock. The file names its holder, so a second run can say who it is. Not for NFS, where flock may not
    reach other machines: drivers on several machines need their own OUT files.
    """

    def __init__(self, out: Path) -> None:
        self.path = out.with_name(f".{out.name}.lock")
        self._handle = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            handle = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 - held until release()
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                handle.close()
                raise OutputInUse(f"{self.path.name[1:-5]} is being written by {holder}: wait for that run to end, "
                                  "or write to another file") from None
            # the file we locked may have been removed by a run that just finished: lock the one at the path
            if os.path.exists(self.path) and os.fstat(handle.fileno()).st_ino == os.stat(self.path).st_ino:
                break
            handle.close()
        handle.seek(0)
        handle.truncate()
        handle.write(f"fruit-batch pid {os.getpid()} on {socket.gethostname()}, started "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        self._handle = handle

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def release(self) -> None:
        if self._handle is not None:
            self.path.unlink(missing_ok=True)
            self._handle.close()
            self._handle = None


class ResultWriter:
    """Appends each result as one ``write`` of a whole line, flushed at once; ``finish`` rewrites atomically.

    The caller holds OUT's ``OutputLock`` for as long as the writer lives.
    """

    def __init__(self, out: Path, order: list[str], resume: bool) -> None:
        self.out = Path(out)
        self.order = order
        self.rows = read_rows(self.out) if resume else {}
        self._rewrite()  # a clean file (header + what is already done) to append to
        self._handle = open(self.out, "a", encoding="utf-8", newline="")  # noqa: SIM115 - closed in finish()

    def add(self, result: Result) -> None:
        row = result.row()
        self.rows[row["path"]] = row
        self._handle.write(_line(row))
        self._handle.flush()

    def finish(self) -> None:
        self._handle.close()
        self._rewrite()

    def _rewrite(self) -> None:
        rank = {p: i for i, p in enumerate(self.order)}
        ordered = sorted(self.rows.values(), key=lambda r: (rank.get(r["path"], len(rank)), r["path"]))
        tmp = self.out.with_name(f".{self.out.name}.tmp")
        with open(tmp, "w", encoding="utf-8", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=COLUMNS, lineterminator="\n")
            writer.writeheader()
            writer.writerows(ordered)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.out)
