"""Which files under DIR get scored, in what order, and what their folder says their class is."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from fruitserve.handler.preprocessing import IMAGE_EXTENSIONS, sniff_image_format


def is_candidate(path: Path) -> bool:
    """An image by extension, or by content whatever its extension (a PNG saved as .txt still gets scored)."""
    if path.suffix.lower() in IMAGE_EXTENSIONS:
        return True
    try:
        with open(path, "rb") as handle:
            return sniff_image_format(handle.read(16)) is not None
    except OSError:
        return False


def find_images(root: Path) -> tuple[list[Path], int]:
    """Candidate files under ``root`` (relative, sorted), and how many other files were passed over.

    Hidden files and folders are skipped; symlinked folders are followed once each, so
    a link loop cannot recurse forever.
    """
    root = Path(root)
    found: list[Path] = []
    ignored = 0
    seen_dirs: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        stat = os.stat(dirpath)
        if (stat.st_dev, stat.st_ino) in seen_dirs:
            dirnames[:] = []
            continue
        seen_dirs.add((stat.st_dev, stat.st_ino))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = Path(dirpath) / name
            if path.is_file() and is_candidate(path):
                found.append(path.relative_to(root))
            else:
                ignored += 1
    return sorted(found, key=lambda p: p.as_posix()), ignored


def folder_labels(paths: Iterable[Path], classes: Iterable[str]) -> dict[Path, str] | None:
    """True labels from ``<class>/…/file`` when every file sits under a folder named after a known class."""
    known = set(classes)
    labels = {}
    for path in paths:
        if len(path.parts) < 2 or path.parts[0] not in known:
            return None
        labels[path] = path.parts[0]
    return labels or None
