"""Where the images to score are, which files count, in what order, and what their folders say their class is.

A source lists its images as relative POSIX paths (sorted: the CSV's order) and reads one by that path. The
scorers and the CSV only ever see those relative paths, never where the bytes live.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from fruitserve.handler.preprocessing import IMAGE_EXTENSIONS, sniff_image_format

from .errors import ServerUnavailable, UsageError

SNIFF_BYTES = 16
LISTING_THREADS = 16


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


class SourceUnavailable(ServerUnavailable):
    """The object store cannot be reached (exit 3, like a server: ``--resume`` once it is back)."""


class RemoteFolder:
    """Objects under a prefix of any filesystem fsspec knows (``s3://bucket/prefix``, ``gs://``, ``memory://``...).

    For S3, credentials and the endpoint come from the standard AWS variables (``AWS_ACCESS_KEY_ID``,
    ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``...), as every AWS tool reads them. Picklable: Ray workers
    and DataLoader processes open the filesystem again on their side, with their own environment.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self._opened = None

    def __str__(self) -> str:
        return self.url

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RemoteFolder) and other.url == self.url

    def __hash__(self) -> int:
        return hash(self.url)

    def __getstate__(self) -> dict:
        return {"url": self.url}  # not the open filesystem: it holds sockets and this process's credentials

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["url"])

    @property
    def _fs_and_root(self):
        if self._opened is None:
            import fsspec

            # a filesystem of our own, not fsspec's shared instance: it reads the credentials as they are now
            fs, root = fsspec.core.url_to_fs(self.url, skip_instance_cache=True, **_storage_options(self.url))
            self._opened = fs, root.rstrip("/")
        return self._opened

    def list(self) -> tuple[list[str], int]:
        fs, root = self._fs_and_root
        try:
            keys = self._find(fs, root)
        except Exception as exc:  # noqa: BLE001 - each filesystem has its own errors: sorted out below
            raise source_error(self.url, exc) from None
        found, ignored = [], 0
        for key in keys:
            rel = key[len(root):].lstrip("/")
            if not rel or any(part.startswith(".") for part in rel.split("/")):
                continue
            if is_image_name(rel) or self._sniff(fs, key):
                found.append(rel)
            else:
                ignored += 1
        if not found and not ignored and not fs.exists(root):
            raise UsageError(f"{self.url}: no such bucket or prefix")
        return sorted(found), ignored

    @staticmethod
    def _find(fs, root: str) -> list[str]:
        """Every key under ``root``. S3 lists 1,000 keys per request, one page after the other: the first level of
        "folders" is listed on its own, then each folder in a thread of its own (BENCHMARKS.md, Batch scoring)."""
        entries = fs.ls(root, detail=True)
        keys = [e["name"] for e in entries if e["type"] != "directory"]
        folders = [e["name"] for e in entries if e["type"] == "directory"]
        with ThreadPoolExecutor(max_workers=LISTING_THREADS) as pool:
            for found in pool.map(lambda folder: fs.find(folder, withdirs=False), folders):
                keys += found
        return keys

    @staticmethod
    def _sniff(fs, key: str) -> bool:
        try:
            return sniff_image_format(fs.cat_file(key, start=0, end=SNIFF_BYTES)) is not None
        except OSError:
            return False

    def read(self, rel: str) -> bytes:
        fs, root = self._fs_and_root
        try:
            return fs.cat_file(f"{root}/{rel}")
        except (FileNotFoundError, PermissionError) as exc:  # this object only: its error row
            raise OSError(f"cannot read {rel}: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - the store itself: the run stops, --resume continues
            raise source_error(self.url, exc) from None


Source = LocalFolder | RemoteFolder


def source_error(url: str, exc: BaseException) -> UsageError | SourceUnavailable:
    """A store that says no (no bucket, bad credentials: exit 2) from one that cannot be reached (exit 3)."""
    text = " ".join(str(exc).split())[:300]
    if isinstance(exc, FileNotFoundError) or "NoSuchBucket" in text:
        return UsageError(f"{url}: no such bucket or prefix ({text})")
    if isinstance(exc, PermissionError) or any(code in text for code in CREDENTIAL_ERRORS):
        return UsageError(f"{url}: access denied; check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY ({text})")
    return SourceUnavailable(f"{url}: the object store cannot be reached ({type(exc).__name__}: {text})")


CREDENTIAL_ERRORS = ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "ExpiredToken",
                     "NoCredentialsError", "Unable to locate credentials")


def _storage_options(url: str) -> dict:
    """Bounded waits for S3: botocore's defaults retry for minutes against an endpoint that is down."""
    if not url.startswith(("s3://", "s3a://")):
        return {}
    # max_concurrency=1: one GET per object; the default sizes each file with a HEAD first (twice the requests)
    return {"config_kwargs": {"connect_timeout": 5, "read_timeout": 60, "retries": {"max_attempts": 3}},
            "max_concurrency": 1}


def open_source(location: str | os.PathLike) -> Source:
    """The source a ``fruit-batch score`` argument names: a URL with a scheme, or a local folder."""
    text = str(location)
    if "://" in text and not text.startswith("file://"):
        try:
            import fsspec

            fsspec.get_filesystem_class(text.split("://", 1)[0])
        except ImportError as exc:
            raise UsageError(f"{text}: this filesystem needs a package that is not installed ({exc}); for s3:// "
                             "pip install 'fruitserve[s3]'") from None
        except ValueError as exc:
            raise UsageError(f"{text}: {exc}") from None
        return RemoteFolder(text.rstrip("/"))
    root = Path(text.removeprefix("file://"))
    if not root.is_dir():
        raise UsageError(f"{location} is not a folder")
    return LocalFolder(root.absolute())  # absolute: Ray workers and DataLoader processes read it from elsewhere


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
