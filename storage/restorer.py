"""Restoring a snapshot's files into a folder: hostile paths refused, each pack fetched once, every byte verified.

Order: validate → directories → files pre-created at full size → data written pack by pack (threads here, or
a ChunkWriter in any process, loaded from the plan file that prepare's process wrote) → whole-file hashes checked
and file metadata set → hard links, fifos, symlinks → their metadata and the directories', deepest first. Every
step goes through verified fds (restore_target.Cursor; format.md §10).
"""

from __future__ import annotations

import errno
import json
import os
import stat
import threading
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import blake3
import pyarrow as pa
import pyarrow.compute as pc

from .errors import IntegrityError, ObjectMissing, VaultflowError
from .manifest import raw_paths
from .pack import HEADER_SIZE, PackEntry, PackReader
from .repository import Repository
from .restore_target import (
    DIR_FLAGS,
    FILE_FLAGS,
    ChangedInTarget,
    Cursor,
    DirectoryNotRestored,
    Ident,
    ident,
    open_target,
    reopen_target,
)

_NOT_CREATED = ("socket", "char", "block", "unknown")
_READ_WHOLE_PACK = 0.5  # fetch the whole pack when at least this share of it is needed, else ranges
_SETID = stat.S_ISUID | stat.S_ISGID
PLAN_VERSION = b"1"

Blobs = dict[bytes, tuple[PackEntry, list[tuple[int, int]]]]  # chunk id -> (entry, [(row, offset in the file)])


class HostilePath(VaultflowError):
    """A manifest path that would escape the target, pass through a link or file, or appear twice: not written."""


@dataclass
class RestoreResult:
    files: int = 0
    bytes: int = 0
    dirs: int = 0
    links: int = 0
    failed: dict[str, str] = field(default_factory=dict)  # path -> why
    skipped: dict[str, str] = field(default_factory=dict)  # path -> why (not an error: e.g. sockets)

    @property
    def ok(self) -> bool:
        return not self.failed


@dataclass
class Written:
    """What writing one batch of packs did: bytes written, and the files that failed there (path -> why)."""

    bytes: int = 0
    failed: dict[str, str] = field(default_factory=dict)


def check_path(raw: bytes) -> list[bytes]:
    """The components of a manifest path, or HostilePath for `..`, absolute, empty or NUL-bearing names."""
    shown = raw.decode("utf-8", "backslashreplace")
    if not raw or raw.startswith(b"/") or b"\x00" in raw:
        raise HostilePath(f"{shown!r}: absolute, empty or containing NUL; refused")
    parts = raw.split(b"/")
    if any(p in (b"", b".", b"..") for p in parts):
        raise HostilePath(f"{shown!r}: has an empty, '.' or '..' component; refused")
    return parts


def select(table: pa.Table, includes: list[str] | list[bytes] | None) -> pa.Table:
    """Rows at or below any of `includes` (all rows when none), plus the directories above them.

    An include is a path as text (encoded like the OS does) or the exact bytes of a path."""
    if not includes:
        return table
    raw = raw_paths(table)
    keep = pa.array([False] * table.num_rows, pa.bool_())
    ancestors: set[bytes] = set()
    for include in includes:
        wanted = (include if isinstance(include, bytes) else os.fsencode(include)).strip(b"/")
        keep = pc.or_(keep, pc.or_(pc.equal(raw, pa.scalar(wanted, pa.binary())),
                                   pc.starts_with(raw, pattern=wanted + b"/")))
        parts = wanted.split(b"/")
        ancestors.update(b"/".join(parts[:n]) for n in range(1, len(parts)))
    if ancestors:
        keep = pc.or_(keep, pc.is_in(raw, pa.array(sorted(ancestors), pa.binary())))
    return table.filter(keep)


class Restorer:
    """Restores one snapshot's rows into `target`; reusable across the threads of one restore.

    `keep_setid`: restore set-user-ID and set-group-ID bits (default: only when running as root, like tar)."""

    def __init__(self, repo: Repository, table: pa.Table, target: str, *, overwrite: bool = False,
                 workers: int = 2, progress: Callable[[int], None] | None = None,
                 keep_setid: bool | None = None) -> None:
        self.repo = repo
        self.rows = table.to_pylist()
        self.raws: list[bytes] = raw_paths(table).to_pylist()
        self.target = os.fsencode(os.path.abspath(target))
        self.overwrite = overwrite
        self.workers = workers
        self.progress = progress or (lambda n: None)
        self.result = RestoreResult()
        self._euid = os.geteuid()
        self.keep_setid = self._euid == 0 if keep_setid is None else keep_setid
        self._lock = threading.Lock()
        self._root = -1
        self._ids: dict[bytes, Ident] = {}  # every directory, file, fifo and link this restore made or adopted
        self._failed_dirs: set[bytes] = set()

    # -- the plan ------------------------------------------------------------------------------------------

    def run(self) -> RestoreResult:
        """The whole restore, packs on a thread pool (the restore flow maps tasks over packs instead)."""
        packs = self.prepare()
        try:
            with ThreadPoolExecutor(self.workers) as pool:
                list(pool.map(lambda p: self.restore_packs([p]), packs))
        except BaseException:
            self.close()
            raise
        return self.finish()

    def prepare(self) -> list[str]:
        """Validate, create directories and empty files; returns the packs to fetch."""
        self._root = open_target(self.target, self.overwrite)
        try:
            self._validate()
            cursor = self._cursor(adopt=self.overwrite)
            try:
                for i in sorted(self._order("dir"), key=self.raws.__getitem__):  # parents before children
                    self._mkdir(cursor, i)
                self._data_files = self._create_files(cursor)
            finally:
                cursor.close()
            self._by_pack = self._plan_packs(self._data_files)
        except BaseException:
            self.close()
            raise
        failed = self.result.failed  # e.g. a chunk missing from the index: its other chunks are not written
        self._skip = {i for i in self._data_files if self._show(i) in failed}
        self._writer = ChunkWriter(self.repo, self._by_pack, self.raws, [r["path"] for r in self.rows], self._ids,
                                  self._failed_dirs, self._skip, root=self._root, progress=self.progress)
        return sorted(self._by_pack)

    def restore_packs(self, packs: list[str]) -> int:
        """Fetch each pack once and write its chunks wherever they belong; returns bytes written."""
        return self.write_packs(packs).bytes

    def write_packs(self, packs: list[str]) -> Written:
        """restore_packs, also returning the files that failed in this batch (finish skips them anyway)."""
        written = self._writer.write(packs)
        self.add_failures(written.failed)
        return written

    def add_failures(self, failed: dict[str, str]) -> None:
        """Files that failed while a ChunkWriter elsewhere wrote packs: finish neither verifies nor counts them."""
        with self._lock:
            self.result.failed.update(failed)

    def save_plan(self, folder: str | Path) -> str:
        """Write what a ChunkWriter in another process needs into `folder` (created, private): the rows it writes,
        each pack's chunk placements, and the identity of the target and of every directory and file prepare
        made or adopted, so that the worker refuses whatever was swapped since. Arrow IPC; returns the folder."""
        folder = Path(folder)
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        root = ident(os.fstat(self._root))
        known = sorted(self._ids.keys() | self._failed_dirs)
        found = [self._ids.get(raw) for raw in known]
        _write_table(folder / "target.arrow", pa.table({
            "raw": pa.array(known, pa.binary()),
            "dev": pa.array([f[0] if f else None for f in found], pa.uint64()),
            "ino": pa.array([f[1] if f else None for f in found], pa.uint64()),
            "failed": pa.array([raw in self._failed_dirs for raw in known], pa.bool_())},
        ).replace_schema_metadata({b"vaultflow-restore-plan": PLAN_VERSION, b"target": self.target,
                                   b"root": f"{root[0]}:{root[1]}".encode()}))
        files = self._data_files
        _write_table(folder / "files.arrow", pa.table({
            "row": pa.array(files, pa.int64()),
            "raw": pa.array([self.raws[i] for i in files], pa.binary()),
            "path": pa.array([self._show(i) for i in files], pa.string()),
            "skip": pa.array([i in self._skip for i in files], pa.bool_())}))
        cols: dict[str, list[Any]] = {name: [] for name in _CHUNK_COLUMNS}
        ranges = {}
        for pack in sorted(self._by_pack):
            start = len(cols["row"])
            for entry, places in self._by_pack[pack].values():
                for i, at in places:
                    for name, value in zip(_CHUNK_COLUMNS, (entry.id, entry.type, entry.offset, entry.length,
                                                            entry.raw_length, i, at), strict=True):
                        cols[name].append(value)
            ranges[pack] = (start, len(cols["row"]))
        _write_table(folder / "chunks.arrow", pa.table(
            {name: pa.array(values, pa.binary() if name == "id" else pa.int64()) for name, values in cols.items()}
        ).replace_schema_metadata({b"packs": json.dumps(ranges).encode()}))
        return str(folder)

    def finish(self) -> RestoreResult:
        """Check whole-file hashes, then create links and special files and set metadata."""
        cursor = self._cursor()
        try:
            self._verify_files(cursor, self._data_files)
            self._make_special(cursor)
            self._set_metadata(cursor)
        finally:
            cursor.close()
            self.close()
        return self.result

    def _cursor(self, adopt: bool = False) -> Cursor:
        return Cursor(self._root, self._ids, self._failed_dirs, adopt)

    def close(self) -> None:
        """Close the target's fd (finish does); the restore cannot continue afterwards."""
        if self._root >= 0:
            os.close(self._root)
            self._root = -1

    def restored_mode(self, mode: int) -> int:
        """The permission bits restore sets for a manifest mode."""
        return stat.S_IMODE(mode) if self.keep_setid else stat.S_IMODE(mode) & ~_SETID

    def _validate(self) -> None:
        """Refuse hostile rows (recorded as failed): escapes, paths below a non-directory, duplicated paths."""
        not_dirs = {raw: row["type"] for raw, row in zip(self.raws, self.rows, strict=True) if row["type"] != "dir"}
        counts = Counter(self.raws)
        self._bad: set[int] = set()
        for i, raw in enumerate(self.raws):
            try:
                if counts[raw] > 1:  # e.g. a file and a symlink at one path: one would be written through the other
                    raise HostilePath(f"{self._show(i)!r}: appears {counts[raw]} times in the manifest; refused")
                parts = check_path(raw)
                for n in range(1, len(parts)):
                    above = b"/".join(parts[:n])
                    if above in not_dirs:
                        raise HostilePath(f"{self._show(i)!r}: passes through the {not_dirs[above]} "
                                          f"{above.decode(errors='backslashreplace')!r}; refused")
            except HostilePath as e:
                self._bad.add(i)
                self.result.failed[self._show(i)] = str(e)

    def _order(self, kind: str) -> list[int]:
        return [i for i, row in enumerate(self.rows) if row["type"] == kind and i not in self._bad]

    def _show(self, i: int) -> str:
        return str(self.rows[i]["path"])

    def _fail(self, i: int, why: str) -> None:
        with self._lock:
            self.result.failed[self._show(i)] = why

    # -- creating entries ----------------------------------------------------------------------------------

    def _mkdir(self, cursor: Cursor, i: int) -> None:
        raw = self.raws[i]
        try:
            parent, name = cursor.parent(raw)
            made = True
            try:
                os.mkdir(name, 0o700, dir_fd=parent)
            except FileExistsError:
                if not self.overwrite:  # the target was empty: someone else put it there
                    raise ChangedInTarget(raw, "appeared before restore created it") from None
                made = False
            try:
                fd = os.open(name, DIR_FLAGS, dir_fd=parent)
            except OSError as e:
                if made:
                    raise ChangedInTarget(raw, e.strerror) from None
                raise VaultflowError("exists and is not a directory") from None
            st = os.fstat(fd)
            if made and st.st_uid != self._euid:  # not the directory mkdir just made
                os.close(fd)
                raise ChangedInTarget(raw)
            self._ids[raw] = ident(st)
            cursor.add(raw, fd)
            self.result.dirs += 1
        except (ChangedInTarget, DirectoryNotRestored) as e:
            self._failed_dirs.add(raw)
            self._fail(i, str(e))
        except (OSError, VaultflowError) as e:
            self._failed_dirs.add(raw)
            self._fail(i, f"directory not created: {getattr(e, 'strerror', None) or e}")

    def _hardlink_groups(self) -> list[int]:
        """Rows whose data is written; sets {later hard link row: first row of its inode}."""
        first: dict[tuple[int, int], int] = {}
        data, alias = [], {}
        for i in self._order("file"):
            row = self.rows[i]
            inode = (row["dev"], row["inode"])
            if row["nlink"] > 1 and inode in first and self.rows[first[inode]]["content_hash"] == row["content_hash"]:
                alias[i] = first[inode]
            else:
                first.setdefault(inode, i)
                data.append(i)
        self._alias = alias
        return data

    def _create_files(self, cursor: Cursor) -> list[int]:
        created = []
        for i in self._hardlink_groups():
            row = self.rows[i]
            if row["chunks"] is None:  # the snapshot holds no data for it: a note, as for a partial read
                with self._lock:
                    self.result.skipped[self._show(i)] = f"not in the snapshot: the backup could not read it " \
                                                          f"({row['error']})"
                continue

            def create(parent: int, name: bytes, size: int = row["size"]) -> Ident:
                fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | FILE_FLAGS, 0o600, dir_fd=parent)
                try:
                    if size:
                        os.ftruncate(fd, size)
                    return ident(os.fstat(fd))
                finally:
                    os.close(fd)

            if self._at(cursor, i, create):
                created.append(i)
        return created

    def _at(self, cursor: Cursor, i: int, make: Callable[[int, bytes], Ident]) -> bool:
        """Create row i's entry with `make(parent fd, name)` (after removing what is there, with overwrite)."""
        raw = self.raws[i]
        try:
            parent, name = cursor.parent(raw)
            if self.overwrite:
                try:
                    os.unlink(name, dir_fd=parent)
                except (FileNotFoundError, IsADirectoryError):
                    pass
            self._ids[raw] = make(parent, name)
            return True
        except VaultflowError as e:  # ChangedInTarget, DirectoryNotRestored
            self._fail(i, str(e))
        except OSError as e:
            self._fail(i, f"not created: {e.strerror}")
        return False

    # -- data ----------------------------------------------------------------------------------------------

    def _plan_packs(self, files: list[int]) -> dict[str, Blobs]:
        """Every chunk occurrence, grouped by the pack that holds it."""
        by_pack: dict[str, Blobs] = defaultdict(dict)
        for i in files:
            offset = 0
            for cid in self.rows[i]["chunks"]:
                found = self.repo.find_blob(cid)
                if found is None:
                    self._fail(i, f"chunk {cid.hex()[:16]} is missing from the repository (not in the index)")
                    break
                pack, entry = found
                by_pack[pack].setdefault(cid, (entry, []))[1].append((i, offset))
                offset += entry.raw_length
        return dict(by_pack)

    def _verify_files(self, cursor: Cursor, files: list[int]) -> None:
        """Hash each file through the fd of the inode restore created, and set its metadata through that fd."""
        key = self.repo.master.file_hash_key
        for i in files:
            if self._show(i) in self.result.failed:
                continue
            row = self.rows[i]
            try:
                fd, st = cursor.open_file(self.raws[i], os.O_RDONLY)
                try:
                    h = blake3.blake3(key=key)
                    left = row["size"] if st.st_size == row["size"] else 0
                    while left and (block := os.read(fd, min(left, 1 << 20))):
                        h.update(block)
                        left -= len(block)
                    if st.st_size != row["size"] or left or h.digest() != row["content_hash"]:
                        self._fail(i, "restored content does not match the file's hash in the manifest")
                        continue
                    self._apply(fd, row)
                finally:
                    os.close(fd)
            except VaultflowError as e:  # ChangedInTarget, DirectoryNotRestored
                self._fail(i, str(e))
                continue
            except OSError as e:
                self._fail(i, f"not verified: {e.strerror}")
                continue
            self.result.files += 1
            self.result.bytes += row["size"]
            if row["status"] == "error":
                self.result.skipped[self._show(i)] = f"restored as backed up, but: {row['error']}"

    # -- links, special files, metadata --------------------------------------------------------------------

    def _make_special(self, cursor: Cursor) -> None:
        for i, first in self._alias.items():
            if self._show(first) in self.result.failed:
                self._fail(i, f"hard link target {self._show(first)!r} failed")
                continue
            if self.rows[first]["chunks"] is None:
                self.result.skipped[self._show(i)] = f"not in the snapshot: hard link to {self._show(first)!r}, " \
                                                     "which the backup could not read"
                continue

            def hardlink(parent: int, name: bytes, first: int = first) -> Ident:
                head, _, existing = self.raws[first].rpartition(b"/")
                os.link(existing, name, src_dir_fd=cursor.dir(head), dst_dir_fd=parent, follow_symlinks=False)
                made = ident(os.stat(name, dir_fd=parent, follow_symlinks=False))
                if made != self._ids[self.raws[first]]:  # the source was swapped: take the link back
                    os.unlink(name, dir_fd=parent)
                    raise ChangedInTarget(self.raws[first])
                return made

            self._at(cursor, i, hardlink)
        for i in self._order("fifo"):
            self._at(cursor, i, self._made(i, stat.S_ISFIFO, _mkfifo))
        for kind in _NOT_CREATED:
            for i in self._order(kind):
                self.result.skipped[self._show(i)] = f"{kind} entries are recorded, not restored"
        for i in self._order("symlink"):  # last, so no restored path can pass through one
            target = self.rows[i]["link_target"]
            if target is None:
                self._fail(i, "symlink target was not recorded")
                continue

            def symlink(parent: int, name: bytes, target: bytes = target) -> None:
                os.symlink(target, name, dir_fd=parent)

            if self._at(cursor, i, self._made(i, stat.S_ISLNK, symlink)):
                self.result.links += 1

    def _made(self, i: int, is_kind: Callable[[int], bool], create: Callable[[int, bytes], None]
              ) -> Callable[[int, bytes], Ident]:
        """`create` plus the identity of what it made, which must be ours (nothing returns an fd here)."""
        def make(parent: int, name: bytes) -> Ident:
            create(parent, name)
            st = os.stat(name, dir_fd=parent, follow_symlinks=False)
            if not is_kind(st.st_mode) or st.st_uid != self._euid or st.st_nlink != 1:
                raise ChangedInTarget(self.raws[i])
            return ident(st)
        return make

    def _set_metadata(self, cursor: Cursor) -> None:
        """Directories, fifos and symlinks (files got theirs when verified), children before their directories."""
        order = sorted((i for i in range(len(self.rows)) if i not in self._bad
                        and self.rows[i]["type"] in ("dir", "fifo", "symlink")),
                       key=lambda i: -self.raws[i].count(b"/"))
        for i in order:
            row, raw = self.rows[i], self.raws[i]
            if self._show(i) in self.result.failed:
                continue
            try:
                if row["type"] == "dir":
                    cursor.trim()
                    self._apply(cursor.dir(raw), row)
                elif row["type"] == "fifo":
                    fd, _ = cursor.open_file(self.raws[i], os.O_RDONLY)
                    try:
                        self._apply(fd, row)
                    finally:
                        os.close(fd)
                else:  # a symlink has no fd to work through; never chmod'ed, and its name is checked first
                    parent, name = cursor.parent(raw)
                    if ident(os.stat(name, dir_fd=parent, follow_symlinks=False)) != self._ids.get(raw):
                        raise ChangedInTarget(raw)
                    if self._euid == 0:
                        os.chown(name, row["uid"], row["gid"], dir_fd=parent, follow_symlinks=False)
                    os.utime(name, ns=(row["mtime_ns"], row["mtime_ns"]), dir_fd=parent, follow_symlinks=False)
            except VaultflowError as e:  # ChangedInTarget, DirectoryNotRestored
                self._fail(i, str(e))
            except OSError as e:
                self._fail(i, f"metadata not restored: {e.strerror}")

    def _apply(self, fd: int, row: dict[str, Any]) -> None:
        """Owner (as root), mode and times of the inode behind `fd`; chown first, since it clears set-ID bits."""
        if self._euid == 0:
            os.fchown(fd, row["uid"], row["gid"])
        os.fchmod(fd, self.restored_mode(row["mode"]))
        os.utime(fd, ns=(row["mtime_ns"], row["mtime_ns"]))


def _mkfifo(parent: int, name: bytes) -> None:
    os.mkfifo(name, 0o600, dir_fd=parent)


_CHUNK_COLUMNS = ("id", "type", "offset", "length", "raw_length", "row", "at")


def _write_table(path: Path, table: pa.Table) -> None:
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)


def _read_table(path: Path) -> pa.Table:
    return pa.ipc.open_file(pa.memory_map(str(path))).read_all()


class _PlannedPacks(Mapping[str, Blobs]):
    """Each pack's chunk placements, read from the plan's table when a batch asks for that pack."""

    def __init__(self, table: pa.Table, ranges: dict[str, list[int]]) -> None:
        self.table, self.ranges = table, ranges

    def __getitem__(self, pack: str) -> Blobs:
        start, end = self.ranges[pack]
        part = self.table.slice(start, end - start)
        blobs: Blobs = {}
        for cid, kind, offset, length, raw_length, row, at in zip(*(part[c].to_pylist() for c in _CHUNK_COLUMNS),
                                                                  strict=True):
            blobs.setdefault(cid, (PackEntry(cid, kind, offset, length, raw_length), []))[1].append((row, at))
        return blobs

    def __iter__(self) -> Iterator[str]:
        return iter(self.ranges)

    def __len__(self) -> int:
        return len(self.ranges)


class ChunkWriter:
    """Writes the chunks of packs into the files a restore's prepare created, through verified fds only.

    The Restorer has one over its own plan; a worker of a task runner (another process, or a Dask worker on this
    machine) loads one from the plan file (`load`). Every directory and file is checked to be the inode prepare
    made, and the target folder, reopened by name there, the one prepare opened: anything swapped since fails
    by name, as in the Restorer's own process. Safe for concurrent `write` calls."""

    def __init__(self, repo: Repository, by_pack: Mapping[str, Blobs], raws: Sequence[bytes] | Mapping[int, bytes],
                 shows: Sequence[str] | Mapping[int, str], ids: dict[bytes, Ident], failed_dirs: set[bytes],
                 skip: set[int], *, root: int = -1, target: bytes = b"", root_id: Ident | None = None,
                 progress: Callable[[int], None] | None = None) -> None:
        self.repo, self.by_pack, self.raws, self.shows = repo, by_pack, raws, shows
        self.ids, self.failed_dirs, self.skip = ids, failed_dirs, skip  # skip: rows that failed before any write
        self.root, self.target, self.root_id = root, target, root_id  # root: prepare's fd, when in its process
        self.progress = progress or (lambda n: None)

    @classmethod
    def load(cls, repo: Repository, folder: str | Path) -> ChunkWriter:
        """The writer for a plan that Restorer.save_plan wrote in `folder` (which must be reachable here)."""
        folder = Path(folder)
        try:
            target, files, chunks = (_read_table(folder / f"{name}.arrow") for name in ("target", "files", "chunks"))
        except (OSError, pa.ArrowInvalid) as e:
            raise VaultflowError(f"restore plan {folder}: cannot read it on this worker ({e}); a worker must run on "
                                 "the machine that holds the restore folder") from None
        meta = target.schema.metadata or {}
        if meta.get(b"vaultflow-restore-plan") != PLAN_VERSION:
            raise VaultflowError(f"restore plan {folder}: version {meta.get(b'vaultflow-restore-plan')!r}, this "
                                 f"vaultflow reads {PLAN_VERSION!r}; run the workers with the flow's vaultflow")
        dev, ino = meta[b"root"].decode().split(":")
        known = target["raw"].to_pylist()
        ids = {raw: (d, n) for raw, d, n in zip(known, target["dev"].to_pylist(), target["ino"].to_pylist(),
                                                strict=True) if d is not None}
        failed_dirs = {raw for raw, bad in zip(known, target["failed"].to_pylist(), strict=True) if bad}
        rows = files["row"].to_pylist()
        skip = {i for i, bad in zip(rows, files["skip"].to_pylist(), strict=True) if bad}
        ranges = json.loads(chunks.schema.metadata[b"packs"])
        return cls(repo, _PlannedPacks(chunks, ranges), dict(zip(rows, files["raw"].to_pylist(), strict=True)),
                   dict(zip(rows, files["path"].to_pylist(), strict=True)), ids, failed_dirs, skip,
                   target=meta[b"target"], root_id=(int(dev), int(ino)))

    def write(self, packs: list[str]) -> Written:
        """Fetch each pack once and write its chunks wherever they belong."""
        out = Written()
        try:
            root = self.root if self.root >= 0 else reopen_target(self.target, self.root_id or (-1, -1))
        except ChangedInTarget as e:
            for pack in packs:
                for _, places in self.by_pack[pack].values():
                    for i, _ in places:
                        out.failed[self.shows[i]] = str(e)
            return out
        cursor = Cursor(root, self.ids, self.failed_dirs, False)
        try:
            for pack in packs:
                out.bytes += self._restore_pack(cursor, pack, self.by_pack[pack], out.failed)
        finally:
            cursor.close()
            if root != self.root:
                os.close(root)
        return out

    def _restore_pack(self, cursor: Cursor, pack: str, blobs: Blobs, failed: dict[str, str]) -> int:
        written = 0
        try:
            reader, sealed = self._fetch(pack, [e for e, _ in blobs.values()])
        except (IntegrityError, ObjectMissing, OSError) as e:
            for _, places in blobs.values():
                for i, _ in places:
                    failed[self.shows[i]] = f"pack {pack} unreadable: {e}"
            return 0
        for cid, (entry, places) in blobs.items():
            try:
                data = reader.blob(sealed[cid], entry)
                self.repo.verify_chunk(data, entry, pack)
            except IntegrityError as e:
                for i, _ in places:
                    failed[self.shows[i]] = f"chunk {cid.hex()[:16]} in {pack} is damaged: {e.problem}"
                continue
            for i, offset in places:
                if i in self.skip or self.shows[i] in failed:
                    continue
                try:
                    fd, _ = cursor.open_file(self.raws[i], os.O_WRONLY)
                    try:
                        if os.pwrite(fd, data, offset) != len(data):
                            raise OSError(errno.EIO, "short write")
                    finally:
                        os.close(fd)
                except VaultflowError as e:  # ChangedInTarget, DirectoryNotRestored
                    failed[self.shows[i]] = str(e)
                except OSError as e:
                    failed[self.shows[i]] = f"write failed: {e.strerror}"
            self.progress(len(data) * len(places))
            written += len(data) * len(places)
        return written

    def _fetch(self, pack: str, entries: list[PackEntry]) -> tuple[PackReader, dict[bytes, bytes]]:
        size = self.repo.backend.size(pack)
        needed = sum(e.length for e in entries)
        if needed >= _READ_WHOLE_PACK * size:
            reader, _, data = self.repo.read_pack(pack)  # checks the pack's hash as well
            view = memoryview(data)
            return reader, {e.id: view[e.offset:e.offset + e.length] for e in entries}  # type: ignore[misc]
        ranges = [(0, HEADER_SIZE)] + [(e.offset, e.offset + e.length) for e in entries]
        parts = self.repo.backend.read_ranges(pack, ranges)
        return PackReader(self.repo.master.blob_key, parts[0], pack), {
            e.id: p for e, p in zip(entries, parts[1:], strict=True)}
