"""Object storage for a repository: any fsspec URL (local path, file://, s3://, memory://).

Owns atomic, never-overwriting writes and listings; retries on transient errors belong to the caller.
"""

from __future__ import annotations

import builtins
import errno
import os
import secrets
import time
from collections.abc import Iterator
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from .errors import ObjectExists, ObjectLocked, ObjectLockError, ObjectMissing


class Backend:
    """A flat namespace of immutable objects below one root URL, named by '/'-separated relative names."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        self.url = url
        fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
        self.fs: fsspec.AbstractFileSystem = fs
        self.root = root.rstrip("/")
        self.is_local = isinstance(fs, LocalFileSystem)
        self.retention: tuple[str, int] | None = None  # S3 Object Lock (mode, days) for every immutable object

    # -- S3 Object Lock --------------------------------------------------------------------------------------

    def _s3(self) -> tuple[Any, str, str]:
        """(the s3fs filesystem, bucket, key prefix); Object Lock exists only on S3."""
        protocol = self.fs.protocol
        if "s3" not in (protocol if isinstance(protocol, tuple) else (protocol,)):
            raise ObjectLockError(f"{self.url}: object lock needs S3 (s3://bucket/prefix)")
        bucket, _, prefix = self.root.partition("/")
        return self.fs, bucket, prefix

    def _call(self, method: str, **kwargs: Any) -> Any:
        from fsspec.asyn import sync

        return sync(self.fs.loop, self.fs._call_s3, method, **kwargs)

    def require_object_lock(self) -> None:
        """Refuse a bucket without Object Lock: retention could not be set on anything."""
        _, bucket, _ = self._s3()
        try:
            conf = self._call("get_object_lock_configuration", Bucket=bucket)
        except Exception as e:  # noqa: BLE001 - the store says no in many ways
            raise ObjectLockError(f"bucket {bucket} has no Object Lock configuration ({e}); create it with "
                                  "Object Lock enabled (it cannot be turned on for an existing bucket on AWS)") \
                from None
        if conf.get("ObjectLockConfiguration", {}).get("ObjectLockEnabled") != "Enabled":
            raise ObjectLockError(f"bucket {bucket}: Object Lock is not enabled")

    def _retain_kwargs(self) -> dict[str, Any]:
        if self.retention is None:
            return {}
        from datetime import UTC, datetime, timedelta

        mode, days = self.retention
        return {"ObjectLockMode": mode, "ObjectLockRetainUntilDate": datetime.now(UTC) + timedelta(days=days)}

    def retained_until(self, name: str) -> float | None:
        """When the object's retention ends (Unix seconds), or None without one."""
        _, bucket, _ = self._s3()
        try:  # HEAD carries the retention (GetObjectRetention needs a permission readers may lack)
            got = self._call("head_object", Bucket=bucket, Key=self.path(name).split("/", 1)[1])
        except FileNotFoundError:
            return None
        until = got.get("ObjectLockRetainUntilDate")
        return float(until.timestamp()) if until is not None else None

    def extend_retention(self, name: str, until: float) -> None:
        """Keep the object at least until `until` (retention only ever grows: the store refuses shortening)."""
        from datetime import UTC, datetime

        assert self.retention is not None
        _, bucket, _ = self._s3()
        self._call("put_object_retention", Bucket=bucket, Key=self.path(name).split("/", 1)[1],
                   Retention={"Mode": self.retention[0],
                              "RetainUntilDate": datetime.fromtimestamp(until, UTC)})

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

    def temporaries(self, prefix: str) -> builtins.list[tuple[str, float]]:
        """(name, age in seconds) of the partial `.tmp-` files below `prefix` that killed local writers left;
        object stores have none (an upload appears whole or not at all)."""
        if not self.is_local:
            return []
        base = self.path(prefix).rstrip("/")
        cut = len(self.root) + 1 if self.root else 0
        found: builtins.list[tuple[str, float]] = []
        now = time.time()
        for folder, _, files in os.walk(base):
            for leaf in files:
                if leaf.startswith(".tmp-"):
                    full = os.path.join(folder, leaf)
                    try:
                        found.append((full[cut:], now - os.lstat(full).st_mtime))
                    except FileNotFoundError:  # its writer finished meanwhile
                        continue
        return sorted(found)

    # -- writing -----------------------------------------------------------------------------------------

    def write(self, name: str, data: bytes, *, content_named: bool = False) -> None:
        """Store a new object atomically; it is never visible half-written and never replaces another.

        Creation is a real create-if-absent: `link()` on local disks, a conditional PUT (`If-None-Match: *`) on
        S3, fsspec's `mode="create"` elsewhere. For a content-named object an existing one of the same name and
        size is the same object (a run resuming after a crash), so the write succeeds without uploading again.
        """
        path = self.path(name)
        if self.is_local:
            self._write_local(path, data, overwrite=False, content_named=content_named, name=name)
            return
        try:  # one PUT, or a multipart upload completed only if absent
            self.fs.pipe_file(path, data, mode="create", **self._retain_kwargs())
        except FileExistsError:
            if content_named and self._size_or_none(path) == len(data):
                return
            raise ObjectExists(f"{name}: refusing to overwrite an existing object in {self.url}") from None

    def _size_or_none(self, path: str) -> int | None:
        try:
            self.fs.invalidate_cache(path)
            return int(self.fs.size(path))
        except FileNotFoundError:
            return None

    def replace(self, name: str, data: bytes) -> None:
        """Atomically write or replace a small mutable object (lock files only)."""
        path = self.path(name)
        if self.is_local:
            self._write_local(path, data, overwrite=True, content_named=False, name=name)
        else:
            self.fs.pipe_file(path, data)

    def modified(self, name: str) -> float | None:
        """When the object was last written (Unix seconds), where the backend says; None when it is gone."""
        try:
            return float(self.fs.modified(self.path(name)).timestamp())
        except FileNotFoundError:
            return None
        except (NotImplementedError, AttributeError, ValueError, TypeError, OSError):
            return None

    def delete(self, name: str) -> None:
        """Remove an object; on local disks the folder is fsync'd so the removal survives a crash too. Under
        Object Lock every stored version is deleted (a plain delete would only hide it behind a delete marker);
        the store refuses versions still retained: ObjectLocked, nothing hidden."""
        path = self.path(name)
        if self.retention is not None and not name.startswith("locks/"):
            self._delete_versions(name)
            return
        try:
            self.fs.rm_file(path)
        except FileNotFoundError:
            return
        if self.is_local:
            _fsync_dir(os.path.dirname(path))

    def _delete_versions(self, name: str) -> None:
        _, bucket, _ = self._s3()
        key = self.path(name).split("/", 1)[1]
        found = self._call("list_object_versions", Bucket=bucket, Prefix=key)
        versions = [v for v in (*found.get("Versions", []), *found.get("DeleteMarkers", [])) if v["Key"] == key]
        refused = []
        for v in versions:
            try:
                self._call("delete_object", Bucket=bucket, Key=key, VersionId=v["VersionId"])
            except PermissionError:  # s3fs maps AccessDenied: the version is still retained
                refused.append(v["VersionId"])
        self.fs.invalidate_cache(self.path(name))
        if refused:
            until = self.retained_until(name)
            raise ObjectLocked(name, until)

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
            self._rename_new(tmp, path, size, content_named, name)

    def _rename_new(self, tmp: str, path: str, size: int, content_named: bool, name: str) -> None:
        """No hard links on this filesystem: renameat2(RENAME_NOREPLACE) where the kernel has it."""
        try:
            _rename_noreplace(tmp, path)
        except FileExistsError:
            if content_named and os.path.getsize(path) == size:
                return
            raise ObjectExists(f"{name}: refusing to overwrite an existing object in {self.url}") from None


def _rename_noreplace(src: str, dst: str) -> None:
    """rename() that fails with FileExistsError instead of replacing `dst` (Linux renameat2)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:  # no atomic no-replace rename here: the check below is the best this system offers
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, "exists", dst)
        os.rename(src, dst)
        return
    at_fdcwd, rename_noreplace = -100, 1
    if renameat2(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), rename_noreplace) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), dst) if err != errno.EEXIST else FileExistsError(err, "exists", dst)


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
