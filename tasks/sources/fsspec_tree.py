"""The fsspec tree source: a folder on any fsspec filesystem (s3://bucket/prefix, memory://, gcs://, …).

Object stores have no inodes, ctimes or modes: the listing records size, mtime and, as `inode`, a number
derived from the object's ETag or checksum where the store reports one, so a rewrite with the same size and
timestamp is still seen as a change.
"""

from __future__ import annotations

import contextlib
import fnmatch
import stat
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO

import blake3
import fsspec
import pyarrow as pa

from vaultflow.storage.errors import SourceError

from .base import LISTING_SCHEMA, Capture, Source, SourceSpec, held, scheme_of, slug


def _mtime_ns(info: dict[str, Any]) -> int:
    for key in ("mtime", "LastModified", "last_modified", "updated", "created"):
        value = info.get(key)
        if isinstance(value, datetime):
            return int(value.timestamp() * 1e9)
        if isinstance(value, int | float):
            return int(value * 1e9)
        if isinstance(value, str):
            try:
                return int(datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp() * 1e9)
            except ValueError:
                continue
    return 0


def _identity(info: dict[str, Any]) -> int:
    for key in ("ETag", "etag", "md5Hash", "crc32c", "checksum"):
        if info.get(key):
            return int.from_bytes(blake3.blake3(str(info[key]).encode()).digest()[:8], "big") >> 1
    return 0


class FsspecTree:
    """Lists and opens the files below one fsspec URL."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        self.url = url.rstrip("/")
        self.fs, root = fsspec.core.url_to_fs(self.url, **(storage_options or {}))
        self.root = root.rstrip("/")

    def scan(self, excludes: list[str] | None = None) -> tuple[pa.Table, list[tuple[bytes, str]]]:
        """The listing (same schema as the local source's), sorted by path."""
        try:
            self.fs.invalidate_cache(self.root)
            found = self.fs.find(self.root, withdirs=True, detail=True)
        except (OSError, ValueError) as e:
            raise SourceError(f"cannot list {self.url}: {e}") from None
        if not found and not self.fs.exists(self.root):
            raise SourceError(f"cannot back up {self.url}: nothing there")
        rows: list[dict[str, Any]] = []
        for path, info in found.items():
            rel = path[len(self.root) + 1:] if path.startswith(self.root + "/") else ""
            name = rel.rsplit("/", 1)[-1]
            if not rel or any(fnmatch.fnmatchcase(rel, p) or fnmatch.fnmatchcase(name, p) for p in excludes or []):
                continue
            is_dir = info.get("type") == "directory"
            mtime = _mtime_ns(info)
            rows.append({"key": rel.encode(), "path": rel, "raw_path": None, "type": "dir" if is_dir else "file",
                         "size": 0 if is_dir else int(info.get("size") or 0),
                         "mode": (stat.S_IFDIR | 0o755) if is_dir else (stat.S_IFREG | 0o644), "uid": 0, "gid": 0,
                         "mtime_ns": mtime, "ctime_ns": mtime, "inode": _identity(info), "dev": 0, "nlink": 1,
                         "link_target": None})
        return pa.Table.from_pylist(rows, schema=LISTING_SCHEMA).sort_by("key"), []

    streams = False

    def open(self, key: bytes) -> contextlib.AbstractContextManager[BinaryIO]:
        f: BinaryIO = self.fs.open(f"{self.root}/{key.decode()}", "rb", block_size=8 << 20)
        return f  # type: ignore[return-value]  # fsspec files are their own context managers

    def tables(self, key: bytes) -> list[dict[str, Any]]:
        return []

    def identity(self, key: bytes) -> tuple[int, int, int]:
        """(size, mtime_ns, version identity) of the object now, to notice a change while it was read."""
        info = self.fs.info(f"{self.root}/{key.decode()}")
        return int(info.get("size") or 0), _mtime_ns(info), _identity(info)


class FsspecSource(Source):
    """A folder at any fsspec URL other than the local filesystem's (s3://bucket/prefix, memory://, gcs://, …).
    Options (credentials included) come from VAULTFLOW_SOURCE_STORAGE_OPTIONS, never from the URL's parameters."""

    kind = "fsspec"

    @classmethod
    def matches(cls, path: str) -> bool:
        scheme = scheme_of(path)
        known = set(fsspec.available_protocols()) | set(fsspec.registry)  # built-in, and registered at runtime
        return bool(scheme) and scheme not in ("file", "local") and scheme in known

    @property
    def url(self) -> str:
        return self.paths[0].rstrip("/")

    def default_name(self) -> str:
        return slug(self.url.replace("://", "-"))

    def capture(self, scratch: Path, excludes: list[str]) -> contextlib.AbstractContextManager[Capture]:
        from vaultflow.tasks import settings

        table, errors = FsspecTree(self.url, settings.source_storage_options()).scan(excludes)
        return held(Capture(listing=table, root=self.url, errors=errors))

    @classmethod
    def reader(cls, spec: SourceSpec) -> FsspecTree:
        from vaultflow.tasks import settings

        return FsspecTree(spec.root, settings.source_storage_options())
