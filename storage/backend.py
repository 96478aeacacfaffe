"""Object storage for a repository: any fsspec URL (local path, file://, s3://, memory://).

Owns atomic, never-overwriting writes and listings; retries on transient errors belong to the caller.
"""

from __future__ import annotations

import errno
import os
import secrets
from collections.abc import Iterator
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from .errors import ObjectExists, ObjectMissing


class Backend:
    """A flat namespace of immutable objects below one root URL, named by '/'-separated relative names."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        self.url = url
        fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
        self.fs: fsspec.AbstractFileSystem = fs
        self.root = root.rstrip("/")
        self.is_local = isinstance(fs, LocalFileSystem)

    def path(self, name: str) -> str:
        """The backend path of the object `name`; names never start with '/' nor contain '..'."""
        if name.startswith("/") or ".." in name.split("/"):
            raise ValueError(f"invalid object name {name!r}")
        return f"{self.root}/{name}" if self.root else name

    # -- reading -----------------------------------------------------------------------------------------

    def read(self, name: str) -> bytes:
        try:
            data: bytes = self.fs.cat_file(self.path(name))
        except FileNotFoundError:
            raise ObjectMissing(f"{name}: object is missing from {self.url}") from None
        return data

    def read_range(self, name: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of an object; a short result means the object is shorter than expected."""
        try:
            data: bytes = self.fs.cat_file(self.path(name), start=start, end=end)
        except FileNotFoundError:
            raise ObjectMissing(f"{name}: object is missing from {self.url}") from None
        return data

    def read_ranges(self, name: str, ranges: list[tuple[int, int]]) -> list[bytes]:
        """Several ranges of one object in as few requests as the backend allows."""
        path = self.path(name)
        try:
            parts: list[bytes] = self.fs.cat_ranges(
                [path] * len(ranges), [r[0] for r in ranges], [r[1] for r in ranges], on_error="raise"
            )
        except FileNotFoundError:
            raise ObjectMissing(f"{name}: object is missing from {self.url}") from None
        return parts

    def exists(self, name: str) -> bool:
        return bool(self.fs.exists(self.path(name)))

    def size(self, name: str) -> int:
        try:
            return int(self.fs.size(self.path(name)))
        except FileNotFoundError:
            raise ObjectMissing(f"{name}: object is missing from {self.url}") from None

    def list(self, prefix: str) -> Iterator[tuple[str, int]]:
        """(name, size) of every object below the folder `prefix`, temp files excluded, sorted by name."""
        base = self.path(prefix).rstrip("/")
        if not self.is_local:
            self.fs.invalidate_cache(base)
        try:
            found = self.fs.find(base, detail=True)
        except FileNotFoundError:
            return
        cut = len(self.root) + 1 if self.root else 0
        for path in sorted(found):
            info = found[path]
            name = path[cut:]
            if info.get("type") == "directory" or name.rsplit("/", 1)[-1].startswith(".tmp-"):
                continue
            yield name, int(info.get("size") or 0)

    # -- writing -----------------------------------------------------------------------------------------

    def write(self, name: str, data: bytes, *, content_named: bool = False) -> None:
        """Store a new object atomically; it is never visible half-written and never replaces another.

        For a content-named object an existing one of the same name and size is the same object (a run
        resuming after a crash), so the write succeeds without uploading again.
        """
        path = self.path(name)
        if self.is_local:
            self._write_local(path, data, overwrite=False, content_named=content_named, name=name)
            return
        if self.fs.exists(path):
            if content_named and int(self.fs.size(path)) == len(data):
                return
            raise ObjectExists(f"{name}: refusing to overwrite an existing object in {self.url}")
        self.fs.pipe_file(path, data)  # one PUT, or a multipart upload that appears only when completed

    def replace(self, name: str, data: bytes) -> None:
        """Atomically write or replace a small mutable object (lock files only)."""
        path = self.path(name)
        if self.is_local:
            self._write_local(path, data, overwrite=True, content_named=False, name=name)
        else:
            self.fs.pipe_file(path, data)

    def delete(self, name: str) -> None:
        try:
            self.fs.rm_file(self.path(name))
        except FileNotFoundError:
            pass

    def _write_local(self, path: str, data: bytes, *, overwrite: bool, content_named: bool, name: str) -> None:
        folder = os.path.dirname(path)
        if not os.path.isdir(folder):
            _make_dirs_durably(folder)
        tmp = os.path.join(folder, f".tmp-{os.path.basename(path)}-{secrets.token_hex(8)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            if overwrite:
                os.replace(tmp, path)
            else:
                self._link_new(tmp, path, len(data), content_named, name)
        finally:
            if os.path.lexists(tmp):
                os.unlink(tmp)
        _fsync_dir(folder)

    def _link_new(self, tmp: str, path: str, size: int, content_named: bool, name: str) -> None:
        # link() fails if the target exists, which rename() would silently replace.
        try:
            os.link(tmp, path)
        except FileExistsError:
            if content_named and os.path.getsize(path) == size:
                return
            raise ObjectExists(f"{name}: refusing to overwrite an existing object in {self.url}") from None
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                raise
            if os.path.exists(path):  # no hard links on this filesystem: check, then rename
                if content_named and os.path.getsize(path) == size:
                    return
                raise ObjectExists(f"{name}: refusing to overwrite an existing object in {self.url}") from None
            os.rename(tmp, path)


def _fsync_dir(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_dirs_durably(folder: str) -> None:
    """Create `folder` and its missing parents, fsyncing each parent so the new entries survive a crash."""
    missing = []
    while folder and not os.path.isdir(folder):
        missing.append(folder)
        folder = os.path.dirname(folder)
    for d in reversed(missing):
        try:
            os.mkdir(d)
        except FileExistsError:
            pass
        _fsync_dir(os.path.dirname(d) or ".")
