"""The filesystem source: walks a local tree into an Arrow listing, never following symlinks.

Names are kept as raw bytes end to end, so names that are not UTF-8 survive byte for byte.
"""

from __future__ import annotations

import fnmatch
import os
import stat
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from vaultflow.storage.errors import SourceError
from vaultflow.storage.manifest import display_path

_TYPES = {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink", stat.S_IFIFO: "fifo",
          stat.S_IFSOCK: "socket", stat.S_IFCHR: "char", stat.S_IFBLK: "block"}

LISTING_SCHEMA = pa.schema([
    ("key", pa.binary()), ("path", pa.string()), ("raw_path", pa.binary()), ("type", pa.string()),
    ("size", pa.int64()), ("mode", pa.uint32()), ("uid", pa.uint32()), ("gid", pa.uint32()),
    ("mtime_ns", pa.int64()), ("ctime_ns", pa.int64()), ("inode", pa.uint64()), ("dev", pa.uint64()),
    ("nlink", pa.uint32()), ("link_target", pa.binary()),
])


def _excluded(rel: bytes, name: bytes, patterns: list[str]) -> bool:
    text, base = os.fsdecode(rel), os.fsdecode(name)
    return any(fnmatch.fnmatchcase(text, p) or fnmatch.fnmatchcase(base, p) for p in patterns)


def scan(root: str | Path, excludes: list[str] | None = None) -> tuple[pa.Table, list[tuple[bytes, str]]]:
    """Walk `root` (a directory, or a single file) into a listing sorted by path; returns (table, errors)."""
    root_b = os.fsencode(os.path.abspath(root))
    try:
        st_root = os.stat(root_b)
    except OSError as e:
        raise SourceError(f"cannot back up {os.fsdecode(root_b)}: {e.strerror}") from None
    patterns = list(excludes or [])
    cols: dict[str, list[object]] = {name: [] for name in LISTING_SCHEMA.names}
    errors: list[tuple[bytes, str]] = []

    def add(rel: bytes, st: os.stat_result, full: bytes) -> str:
        kind = _TYPES.get(stat.S_IFMT(st.st_mode), "unknown")
        text, raw = display_path(rel)
        target = None
        if kind == "symlink":
            try:
                target = os.readlink(full)
            except OSError as e:
                errors.append((rel, f"symlink target unreadable: {e.strerror}"))
        for name, value in (("key", rel), ("path", text), ("raw_path", raw), ("type", kind),
                            ("size", st.st_size if kind == "file" else 0), ("mode", st.st_mode),
                            ("uid", st.st_uid), ("gid", st.st_gid), ("mtime_ns", st.st_mtime_ns),
                            ("ctime_ns", st.st_ctime_ns), ("inode", st.st_ino), ("dev", st.st_dev),
                            ("nlink", st.st_nlink), ("link_target", target)):
            cols[name].append(value)
        return kind

    if not stat.S_ISDIR(st_root.st_mode):  # a single file: its folder is the root
        folder, name = os.path.split(root_b)
        add(name, os.lstat(root_b), root_b)
        root_b = folder
    else:
        stack = [b""]
        while stack:
            rel_dir = stack.pop()
            full_dir = root_b + b"/" + rel_dir if rel_dir else root_b
            try:
                it = os.scandir(full_dir)
            except OSError as e:
                errors.append((rel_dir, f"directory unreadable: {e.strerror}"))
                continue
            with it:
                for de in it:
                    rel = rel_dir + b"/" + de.name if rel_dir else de.name
                    if patterns and _excluded(rel, de.name, patterns):
                        continue
                    try:
                        st = de.stat(follow_symlinks=False)
                    except OSError as e:
                        errors.append((rel, f"vanished or unreadable while listing: {e.strerror}"))
                        continue
                    if add(rel, st, de.path) == "dir":
                        stack.append(rel)
    table = pa.table(cols, schema=LISTING_SCHEMA).sort_by("key")
    return table, errors


class ListingInfo(BaseModel):
    """What `discover` found; the listing itself stays on local scratch."""

    listing: str
    root: str
    entries: int
    files: int
    bytes: int
    errors: list[tuple[str, str]]  # (path, message), paths decoded for display


@task(cache_policy=NO_CACHE, persist_result=False)
def discover(run: str, path: str, excludes: list[str]) -> ListingInfo:
    """Walk a local tree into an Arrow listing on the run's scratch space."""
    from vaultflow.tasks import context

    table, errors = scan(path, excludes)
    out = context.get(run).scratch / "listing.arrow"
    with pa.OSFile(str(out), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    files = table.filter(pc.equal(table["type"], "file"))
    abs_path = os.path.abspath(path)
    root = abs_path if os.path.isdir(abs_path) else os.path.dirname(abs_path)
    return ListingInfo(listing=str(out), root=root, entries=table.num_rows, files=files.num_rows,
                       bytes=int(pc.sum(files["size"]).as_py() or 0),
                       errors=[(display_path(p)[0], m) for p, m in errors])
