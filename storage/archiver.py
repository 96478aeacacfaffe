"""Change detection and archiving: which files to read, reading them into packs, and the files table.

Works on Arrow tables and scratch files; a batch's bytes never leave this module, only small results.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import BinaryIO, Protocol

import blake3
import pyarrow as pa
import pyarrow.compute as pc

from .crypto import keyed_hash
from .errors import SourceError
from .manifest import FILES_SCHEMA, ID, raw_paths
from .pack import BlobType
from .repository import Repository
from .upload import WriteSession

# A file whose mtime is this close to (or after) the moment the parent backup started may have changed again
# after the parent read it, within one timestamp tick: its metadata cannot prove it unchanged, so reread it.
RACY_NS = 2_000_000_000
_STAT_COLS = ("size", "mtime_ns", "ctime_ns", "inode")
RESULT_SCHEMA = pa.schema([("content_hash", ID), ("chunks", pa.list_(ID)), ("size", pa.int64()),
                           ("mtime_ns", pa.int64()), ("ctime_ns", pa.int64()), ("inode", pa.uint64()),
                           ("error", pa.string())])


def plan_changes(listing: pa.Table, parent: pa.Table | None, parent_started_ns: int, full: bool) -> pa.Table:
    """The listing plus `read` (must be read), `status`, and the parent's chunks for files that are unchanged.

    A file is unchanged when type, size, mtime, ctime and inode all match the parent's entry, the parent read
    it without error, and its mtime is older than RACY_NS before the parent backup started (racy-git's rule).
    """
    parent = parent if parent is not None else FILES_SCHEMA.empty_table()
    p = pa.table({"p_key": raw_paths(parent), "p_type": parent["type"], "p_status": parent["status"],
                  "p_row": pa.array(range(parent.num_rows), pa.int64()),
                  **{f"p_{c}": parent[c] for c in _STAT_COLS}})
    j = listing.join(p, keys="key", right_keys="p_key", join_type="left outer").sort_by("key")
    is_file = pc.equal(j["type"], "file")
    known = pc.is_valid(j["p_row"])
    same = pc.and_(is_file, pc.equal(j["p_type"], "file"))
    for c in _STAT_COLS:
        same = pc.and_(same, pc.equal(j[c], j[f"p_{c}"]))
    same = pc.and_(same, pc.not_equal(j["p_status"], "error"))
    same = pc.and_(same, pc.less(j["mtime_ns"], parent_started_ns - RACY_NS))
    same = pc.fill_null(same, False)
    if full:
        same = pa.array([False] * j.num_rows, pa.bool_())
    from_parent = parent.take(j["p_row"])  # aligned with j; null rows where the parent has no entry
    metadata_same = pc.fill_null(pc.and_(pc.equal(j["mtime_ns"], j["p_mtime_ns"]),
                                         pc.equal(j["ctime_ns"], j["p_ctime_ns"])), False)
    status = pc.if_else(pc.invert(known), "new",
                        pc.if_else(pc.or_(same, pc.and_(pc.invert(is_file), metadata_same)), "unchanged", "changed"))

    def keep(col: str) -> pa.Array:
        return pc.if_else(same, from_parent[col], pa.nulls(j.num_rows, from_parent[col].type))

    out = j.drop_columns([c for c in j.column_names if c.startswith("p_")])
    return out.append_column("content_hash", keep("content_hash")).append_column("chunks", keep("chunks")) \
        .append_column("parent_hash", from_parent["content_hash"]).append_column("status", status) \
        .append_column("read", pc.and_(is_file, pc.invert(same)))


def batches(sizes: list[int], max_bytes: int, max_files: int) -> list[tuple[int, int]]:
    """[start, end) row ranges of consecutive files, each up to max_bytes (a larger file alone) or max_files.

    Largest first: a big file's batch started last would leave the other workers idle at the end.
    """
    out, start, total = [], 0, 0
    for i, size in enumerate(sizes):
        if i > start and (total + size > max_bytes or i - start >= max_files):
            out.append((total, start, i))
            start, total = i, 0
        total += size
    if start < len(sizes):
        out.append((total, start, len(sizes)))
    return [(s, e) for _, s, e in sorted(out, key=lambda b: (-b[0], b[1]))]


@dataclass
class BatchStats:
    files: int = 0
    bytes_read: int = 0
    chunks: int = 0
    chunks_new: int = 0
    errors: int = 0


class RemoteFiles(Protocol):
    """Entries that are not local files (tasks.sources.base.Reader): an fsspec tree, or streams of unknown length
    whose producer's failure surfaces as an exception when the stream is closed."""

    streams: bool

    def open(self, key: bytes) -> AbstractContextManager[BinaryIO]: ...

    def identity(self, key: bytes) -> tuple[int, int, int]: ...  # size, mtime_ns, version identity


def archive_files(repo: Repository, session: WriteSession, root: str, keys: list[bytes],
                  remote: RemoteFiles | None = None,
                  idents: list[tuple[int, int]] | None = None) -> tuple[pa.Table, BatchStats]:
    """Read, chunk, hash and pack each file under `root` (or of `remote`); returns one result row per file.

    A file that cannot be read is an error row (the snapshot records it); a stream that cannot be read raises
    SourceError (the snapshot fails: a partial dump is not a backup).

    `idents` are the listing's (dev, inode) of each local file: a file whose opened inode is another one was
    replaced since it was listed (perhaps by a link to a file its owner could not read) and is not stored.
    """
    packer = session.packer()
    chunker = repo.chunker()
    id_key, file_key = repo.master.chunk_id_key, repo.master.file_hash_key
    rows: dict[str, list[object]] = {name: [] for name in RESULT_SCHEMA.names}
    stats = BatchStats()
    dirs: _Folders | None = None
    try:
        for i, key in enumerate(keys):
            result: tuple[object, ...]
            try:
                if remote is not None and remote.streams:
                    result = _archive_stream(remote, key, chunker, packer, session, id_key, file_key, stats)
                elif remote is not None:
                    result = _archive_remote(remote, key, chunker, packer, session, id_key, file_key, stats)
                else:
                    if dirs is None:
                        dirs = _Folders(os.fsencode(root))
                    dir_fd, name = dirs.parent_of(key)
                    ident = idents[i] if idents is not None else None
                    result = _archive_one(dir_fd, name, ident, chunker, packer, session, id_key, file_key, stats)
            except OSError as e:
                result = (None, None, 0, 0, 0, 0, _describe(e))
            if result[-1] is not None:
                stats.errors += 1
            stats.files += 1
            for col, value in zip(RESULT_SCHEMA.names, result, strict=True):
                rows[col].append(value)
    finally:
        if dirs is not None:
            dirs.close()
    return pa.table(rows, schema=RESULT_SCHEMA), stats


_PATH = getattr(os, "O_PATH", os.O_RDONLY)  # O_PATH needs only search permission on a folder passed through
_DIR = _PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK  # O_NONBLOCK: a fifo swapped in cannot hang us
REPLACED = "changed while being read (replaced since it was listed); not stored"


class _Folders:
    """Open folders from the root down to the current file's parent, reused by its siblings (keys come sorted).

    Only the root is opened by its path; each folder below is opened from its parent's descriptor with
    O_NOFOLLOW|O_DIRECTORY, so a folder swapped for a symlink (or a file) fails to open instead of leading
    elsewhere.
    """

    def __init__(self, root: bytes) -> None:
        self.root = os.open(root, _DIR & ~os.O_NOFOLLOW)  # the folder the user named may itself be a symlink
        self.names: list[bytes] = []
        self.fds: list[int] = []
        self.current: bytes | None = None  # the folder part of the last key, whose fd is fds[-1] (or root)

    def parent_of(self, key: bytes) -> tuple[int, bytes]:
        """(descriptor of the folder holding `key`, the file's own name)."""
        head, _, name = key.rpartition(b"/")
        if head == self.current:  # a sibling of the last file: most keys, so the cheapest path
            return (self.fds[-1] if self.fds else self.root), name
        self.current = None  # until the chain below is complete
        parts = head.split(b"/") if head else []
        names, fds = self.names, self.fds
        keep = 0
        while keep < len(names) and keep < len(parts) and names[keep] == parts[keep]:
            keep += 1
        self._truncate(keep)
        for part in parts[keep:]:
            fds.append(os.open(part, _DIR, dir_fd=fds[-1] if fds else self.root))
            names.append(part)
        self.current = head
        return (fds[-1] if fds else self.root), name

    def _truncate(self, keep: int) -> None:
        while len(self.fds) > keep:
            self.names.pop()
            os.close(self.fds.pop())

    def close(self) -> None:
        self._truncate(0)
        os.close(self.root)


def _describe(e: OSError) -> str:
    if e.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
        return REPLACED  # O_NOFOLLOW met a symlink (EMLINK on FreeBSD), or O_DIRECTORY a file
    if isinstance(e, FileNotFoundError):
        return "vanished before it could be read"
    if isinstance(e, PermissionError):
        return "permission denied"
    return f"read failed: {e.strerror or e}"


def _archive_one(dir_fd: int, name: bytes, ident: tuple[int, int] | None,  # type: ignore[no-untyped-def]
                 chunker, packer, session, id_key, file_key, stats: BatchStats) -> tuple[object, ...]:
    fd = os.open(name, _FILE, dir_fd=dir_fd)
    with os.fdopen(fd, "rb", buffering=0) as f:
        before = os.fstat(fd)
        # Checked before a byte is read: another inode's bytes must never reach a pack under this path
        if ident is not None and (before.st_dev, before.st_ino) != ident:
            return None, None, 0, 0, 0, 0, REPLACED
        if not stat.S_ISREG(before.st_mode):
            return None, None, 0, 0, 0, 0, "no longer a regular file"
        digest, ids, read = _chunk_stream(f, chunker, packer, session, id_key, file_key, stats)
        after = os.fstat(fd)
    stats.bytes_read += read
    error = None
    if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns) or read != before.st_size:
        error = f"changed while being read ({before.st_size} bytes at open, {read} read); stored what was read"
    return (digest, ids, read, before.st_mtime_ns, before.st_ctime_ns, before.st_ino, error)


def _chunk_stream(f: BinaryIO, chunker, packer, session, id_key: bytes, file_key: bytes,  # type: ignore[no-untyped-def]
                  stats: BatchStats) -> tuple[bytes, list[bytes], int]:
    """Chunk, hash and pack one open file; returns (keyed content hash, chunk ids, bytes read)."""
    file_hash = blake3.blake3(key=file_key)
    ids: list[bytes] = []
    read = 0
    for chunk in chunker.stream(f):
        file_hash.update(chunk)
        cid = keyed_hash(id_key, chunk)
        ids.append(cid)
        read += len(chunk)
        stats.chunks += 1
        if session.claim([cid])[0]:
            packer.add(cid, BlobType.DATA, chunk)
            stats.chunks_new += 1
    return file_hash.digest(), ids, read


def _archive_remote(remote: RemoteFiles, key: bytes, chunker, packer, session, id_key, file_key,  # type: ignore[no-untyped-def]
                    stats: BatchStats) -> tuple[object, ...]:
    size, mtime, ident = remote.identity(key)
    with remote.open(key) as f:
        digest, ids, read = _chunk_stream(f, chunker, packer, session, id_key, file_key, stats)
    stats.bytes_read += read
    error = None
    if remote.identity(key)[:2] != (size, mtime) or read != size:
        error = f"changed while being read ({size} bytes listed, {read} read); stored what was read"
    return digest, ids, read, mtime, mtime, ident, error


def _archive_stream(remote: RemoteFiles, key: bytes, chunker, packer, session, id_key, file_key,  # type: ignore[no-untyped-def]
                    stats: BatchStats) -> tuple[object, ...]:
    try:
        with remote.open(key) as f:
            digest, ids, read = _chunk_stream(f, chunker, packer, session, id_key, file_key, stats)
    except OSError as e:
        raise SourceError(f"stream {key.decode(errors='replace')} could not be read: {e.strerror or e}; "
                          "nothing was committed") from None
    stats.bytes_read += read
    now = time.time_ns()
    return digest, ids, read, now, now, 0, None


def files_table(plan: pa.Table, read_rows: pa.Table, results: pa.Table) -> pa.Table:
    """The snapshot's files table: unread rows of the plan plus the read rows updated with their results."""
    status = pc.if_else(pc.is_valid(results["error"]), "error",
                        pc.if_else(pc.is_null(read_rows["parent_hash"]), "new",
                                   pc.if_else(pc.fill_null(pc.equal(results["content_hash"],
                                                                    read_rows["parent_hash"]), False),
                                              "unchanged", "changed")))
    updated = read_rows
    for col in ("content_hash", "chunks", "size", "mtime_ns", "ctime_ns", "inode"):
        column = results[col].cast(FILES_SCHEMA.field(col).type)
        updated = updated.set_column(updated.column_names.index(col), col, column)
    updated = updated.set_column(updated.column_names.index("status"), "status", status)
    updated = updated.append_column("error", results["error"])
    unread = plan.filter(pc.invert(plan["read"]))
    unread = unread.append_column("error", pa.nulls(unread.num_rows, pa.string()))
    both = pa.concat_tables([unread.select(updated.column_names), updated])
    return both.sort_by("key").select(FILES_SCHEMA.names).cast(FILES_SCHEMA)
