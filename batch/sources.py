"""Where the images to score are, which files count, in what order, and what their folders say their class is.

A source lists its images as relative POSIX paths (sorted: the CSV's order) and reads one by that path. The
scorers and the CSV only ever see those relative paths, never where the bytes live.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from fruitserve.handler.preprocessing import IMAGE_EXTENSIONS, sniff_image_format

from .errors import UsageError

SNIFF_BYTES = 16


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


@dataclass(frozen=True)
class LocalFolder:
    """A folder tree on this machine."""

    root: Path

    def __str__(self) -> str:
        return str(self.root)

    def list(self) -> tuple[list[str], int]:
        """Candidate files (relative, sorted) and how many other files were passed over.

        An image by extension, or by content whatever its extension (a PNG saved as .txt still gets scored).
        Hidden files and folders are skipped; symlinked folders are followed once each, so a link loop cannot
        recurse forever.
        """
        found: list[str] = []
        ignored = 0
        seen_dirs: set[tuple[int, int]] = set()
        for dirpath, dirnames, filenames in os.walk(self.root, followlinks=True):
            stat = os.stat(dirpath)
            if (stat.st_dev, stat.st_ino) in seen_dirs:
                dirnames[:] = []
                continue
            seen_dirs.add((stat.st_dev, stat.st_ino))
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in filenames:
                path = Path(dirpath) / name
                if name.startswith("."):
                    continue
                if path.is_file() and (is_image_name(name) or self._sniff(path)):
                    found.append(path.relative_to(self.root).as_posix())
                else:
                    ignored += 1
        return sorted(found), ignored

    @staticmethod
    def _sniff(path: Path) -> bool:
        try:
            with open(path, "rb") as handle:
                return sniff_image_format(handle.read(SNIFF_BYTES)) is not None
        except OSError:
            return False

    def read(self, rel: str) -> bytes:
        return (self.root / rel).read_bytes()


Source = LocalFolder


def open_source(location: str | os.PathLike) -> Source:
    """The source a ``fruit-batch score`` argument names."""
    root = Path(location)
    if not root.is_dir():
        raise UsageError(f"{location} is not a folder")
    return LocalFolder(root)


def folder_labels(paths: Iterable[str], classes: Iterable[str]) -> dict[str, str] | None:
    """True labels from ``<class>/…/file`` when every file sits under a folder named after a known class."""
    known = set(classes)
    labels = {}
    for path in paths:
        top, sep, _ = path.partition("/")
        if not sep or top not in known:
            return None
        labels[path] = top
    return labels or None
