"""Restoring a snapshot's files into a folder: hostile paths refused, each pack fetched once, every byte verified.

Order: validate → directories → files pre-created at full size → data written pack by pack (threads) →
whole-file hashes checked → hard links, fifos, symlinks → modes, owners and times, deepest first.
"""

from __future__ import annotations

import os
import stat
import threading
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import blake3
import pyarrow as pa
import pyarrow.compute as pc

from .errors import IntegrityError, ObjectMissing, VaultflowError
from .manifest import raw_paths
from .pack import HEADER_SIZE, PackEntry, PackReader
from .repository import Repository

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NOT_CREATED = ("socket", "char", "block", "unknown")
_READ_WHOLE_PACK = 0.5
_DIR_FD_CACHE = 256  # fetch the whole pack when at least this share of it is needed, else ranges


class HostilePath(VaultflowError):
    """A manifest path that would escape the target or pass through a link; nothing is written for it."""


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
    """Restores one snapshot's rows into `target`; reusable across the threads of one restore."""

    def __init__(self, repo: Repository, table: pa.Table, target: str, *, overwrite: bool = False,
                 workers: int = 2, progress: Callable[[int], None] | None = None) -> None:
        self.repo = repo
        self.rows = table.to_pylist()
        self.raws: list[bytes] = raw_paths(table).to_pylist()
        self.target = os.fsencode(os.path.abspath(target))
        self.overwrite = overwrite
        self.workers = workers
        self.progress = progress or (lambda n: None)
        self.result = RestoreResult()
        self._lock = threading.Lock()
        self._dir_fds: dict[bytes, int] = {}

    # -- the plan ------------------------------------------------------------------------------------------

    def run(self) -> RestoreResult:
        """The whole restore, packs on a thread pool (the restore flow maps tasks over packs instead)."""
        packs = self.prepare()
        with ThreadPoolExecutor(self.workers) as pool:
            list(pool.map(lambda p: self.restore_packs([p]), packs))
        return self.finish()

    def prepare(self) -> list[str]:
        """Validate, create directories and empty files; returns the packs to fetch."""
        self._prepare_target()
        self._links = self._validate()
        for i in self._order("dir"):
            self._mkdir(i)
        self._data_files = self._create_files()
        self._by_pack = self._plan_packs(self._data_files)
        return sorted(self._by_pack)

    def restore_packs(self, packs: list[str]) -> int:
        """Fetch each pack once and write its chunks wherever they belong; returns bytes written."""
        return sum(self._restore_pack(p, self._by_pack[p]) for p in packs)

    def finish(self) -> RestoreResult:
        """Check whole-file hashes, then create links and special files and set metadata."""
        try:
            self._verify_files(self._data_files)
            self._make_special(self._links)
            self._set_metadata()
        finally:
            with self._lock:
                self._close_dir_fds()
        return self.result

    def _prepare_target(self) -> None:
        os.makedirs(self.target, exist_ok=True)
        if os.listdir(self.target) and not self.overwrite:
            raise VaultflowError(f"{os.fsdecode(self.target)} is not empty; restore into an empty folder or pass "
                                 "--overwrite to replace files that exist there")

    def _validate(self) -> set[bytes]:
        """Refuse hostile rows (recorded as failed); returns the symlink paths."""
        links = {raw for raw, row in zip(self.raws, self.rows, strict=True) if row["type"] == "symlink"}
        self._bad: set[int] = set()
        for i, raw in enumerate(self.raws):
            try:
                parts = check_path(raw)
                for n in range(1, len(parts)):
                    if b"/".join(parts[:n]) in links:
                        raise HostilePath(f"{self._show(i)!r}: passes through the symlink "
                                          f"{b'/'.join(parts[:n]).decode(errors='backslashreplace')!r}; refused")
            except HostilePath as e:
                self._bad.add(i)
                self.result.failed[self._show(i)] = str(e)
        return links

    def _order(self, kind: str) -> list[int]:
        return [i for i, row in enumerate(self.rows) if row["type"] == kind and i not in self._bad]

    def _show(self, i: int) -> str:
        return str(self.rows[i]["path"])

    def _fail(self, i: int, why: str) -> None:
        with self._lock:
            self.result.failed[self._show(i)] = why

    # -- creating entries ----------------------------------------------------------------------------------

    def _parent_fd(self, raw: bytes) -> tuple[int, bytes]:
        """An fd of the entry's parent directory (the caller closes it), opened component by component without
        following links; the parent's own fd is cached, since siblings come together."""
        parent, _, name = raw.rpartition(b"/")
        with self._lock:
            cached = self._dir_fds.get(parent)
            if cached is not None:
                return os.dup(cached), name
        fd = os.open(self.target, _DIR_FLAGS)
        try:
            for part in parent.split(b"/") if parent else []:
                nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = nxt
        except OSError:
            os.close(fd)
            raise
        with self._lock:
            if len(self._dir_fds) >= _DIR_FD_CACHE:
                self._close_dir_fds()
            self._dir_fds[parent] = os.dup(fd)
        return fd, name

    def _close_dir_fds(self) -> None:
        for fd in self._dir_fds.values():
            os.close(fd)
        self._dir_fds.clear()

    def _mkdir(self, i: int) -> None:
        try:
            fd, name = self._parent_fd(self.raws[i])
            try:
                os.mkdir(name, 0o700, dir_fd=fd)
            except FileExistsError:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                if not stat.S_ISDIR(st.st_mode):
                    raise VaultflowError("exists and is not a directory") from None
            finally:
                os.close(fd)
            self.result.dirs += 1
        except (OSError, VaultflowError) as e:
            self._fail(i, f"directory not created: {getattr(e, 'strerror', None) or e}")

    def _hardlink_groups(self) -> tuple[list[int], dict[int, int]]:
        """(rows whose data is written, {later hard link row: first row of its inode})."""
        first: dict[tuple[int, int], int] = {}
        data, alias = [], {}
        for i in self._order("file"):
            row = self.rows[i]
            ident = (row["dev"], row["inode"])
            if row["nlink"] > 1 and ident in first and self.rows[first[ident]]["content_hash"] == row["content_hash"]:
                alias[i] = first[ident]
            else:
                first.setdefault(ident, i)
                data.append(i)
        self._alias = alias
        return data, alias

    def _create_files(self) -> list[int]:
        data, _ = self._hardlink_groups()
        created = []
        for i in data:
            row = self.rows[i]
            if row["chunks"] is None:
                self._fail(i, f"not restored: the backup could not read it ({row['error']})")
                continue

            def create(name: bytes, fd: int, size: int = row["size"]) -> None:
                f = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                            dir_fd=fd)
                try:
                    os.ftruncate(f, size)
                finally:
                    os.close(f)

            if self._at(i, create):
                created.append(i)
        return created

    # -- data ----------------------------------------------------------------------------------------------

    def _plan_packs(self, files: list[int]) -> dict[str, dict[bytes, tuple[PackEntry, list[tuple[int, int]]]]]:
        """Every chunk occurrence, grouped by the pack that holds it."""
        by_pack: dict[str, dict[bytes, tuple[PackEntry, list[tuple[int, int]]]]] = defaultdict(dict)
        for i in files:
            offset = 0
            for cid in self.rows[i]["chunks"]:
                found = self.repo.index.lookup(cid)
                if found is None:
                    self._fail(i, f"chunk {cid.hex()[:16]} is missing from the repository (not in the index)")
                    break
                pack, entry = found
                by_pack[pack].setdefault(cid, (entry, []))[1].append((i, offset))
                offset += entry.raw_length
        return dict(by_pack)

    def _restore_pack(self, pack: str, blobs: dict[bytes, tuple[PackEntry, list[tuple[int, int]]]]) -> int:
        written = 0
        targets = [t for _, ts in blobs.values() for t in ts]
        try:
            reader, sealed = self._fetch(pack, [e for e, _ in blobs.values()])
        except (IntegrityError, ObjectMissing, OSError) as e:
            for i, _ in targets:
                self._fail(i, f"pack {pack} unreadable: {e}")
            return 0
        for cid, (entry, places) in blobs.items():
            try:
                data = reader.blob(sealed[cid], entry)
                self.repo.verify_chunk(data, entry, pack)
            except IntegrityError as e:
                for i, _ in places:
                    self._fail(i, f"chunk {cid.hex()[:16]} in {pack} is damaged: {e.problem}")
                continue
            for i, offset in places:
                if self._show(i) in self.result.failed:
                    continue
                try:
                    fd = os.open(os.path.join(self.target, self.raws[i]), os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                    try:
                        os.pwrite(fd, data, offset)
                    finally:
                        os.close(fd)
                except OSError as e:
                    self._fail(i, f"write failed: {e.strerror}")
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

    def _verify_files(self, files: list[int]) -> None:
        key = self.repo.master.file_hash_key
        for i in files:
            if self._show(i) in self.result.failed:
                continue
            h = blake3.blake3(key=key)
            with open(os.path.join(self.target, self.raws[i]), "rb", buffering=0) as f:
                while block := f.read(1 << 20):
                    h.update(block)
            row = self.rows[i]
            if h.digest() != row["content_hash"]:
                self._fail(i, "restored content does not match the file's hash in the manifest")
            else:
                self.result.files += 1
                self.result.bytes += row["size"]
                if row["status"] == "error":
                    self.result.skipped[self._show(i)] = f"restored as backed up, but: {row['error']}"

    # -- links, special files, metadata --------------------------------------------------------------------

    def _make_special(self, links: set[bytes]) -> None:
        for i, first in self._alias.items():
            if self._show(first) in self.result.failed:
                self._fail(i, f"hard link target {self._show(first)!r} failed")
                continue
            existing = os.path.join(self.target, self.raws[first])

            def hardlink(name: bytes, fd: int, existing: bytes = existing) -> None:
                os.link(existing, name, dst_dir_fd=fd, follow_symlinks=False)

            self._at(i, hardlink)
        for i in self._order("fifo"):
            self._at(i, _mkfifo)
        for kind in _NOT_CREATED:
            for i in self._order(kind):
                self.result.skipped[self._show(i)] = f"{kind} entries are recorded, not restored"
        for i in self._order("symlink"):  # last, so no restored path can pass through one
            target = self.rows[i]["link_target"]
            if target is None:
                self._fail(i, "symlink target was not recorded")
                continue

            def symlink(name: bytes, fd: int, target: bytes = target) -> None:
                os.symlink(target, name, dir_fd=fd)

            if self._at(i, symlink):
                self.result.links += 1

    def _at(self, i: int, make: Callable[[bytes, int], None]) -> bool:
        try:
            fd, name = self._parent_fd(self.raws[i])
            try:
                if self.overwrite:
                    try:
                        os.unlink(name, dir_fd=fd)
                    except (FileNotFoundError, IsADirectoryError):
                        pass
                make(name, fd)
            finally:
                os.close(fd)
            return True
        except OSError as e:
            self._fail(i, f"not created: {e.strerror}")
            return False

    def _set_metadata(self) -> None:
        as_root = os.geteuid() == 0
        order = sorted((i for i in range(len(self.rows)) if i not in self._bad),
                       key=lambda i: -self.raws[i].count(b"/"))  # children before their directories
        for i in order:
            row = self.rows[i]
            if self._show(i) in self.result.failed or row["type"] in _NOT_CREATED:
                continue
            try:
                fd, name = self._parent_fd(self.raws[i])
            except OSError:
                continue
            try:
                link = row["type"] == "symlink"
                if as_root:
                    os.chown(name, row["uid"], row["gid"], dir_fd=fd, follow_symlinks=False)
                if not link:
                    os.chmod(name, stat.S_IMODE(row["mode"]), dir_fd=fd)
                os.utime(name, ns=(row["mtime_ns"], row["mtime_ns"]), dir_fd=fd, follow_symlinks=False)
            except OSError as e:
                self._fail(i, f"metadata not restored: {e.strerror}")
            finally:
                os.close(fd)


def _mkfifo(name: bytes, fd: int) -> None:
    os.mkfifo(name, 0o600, dir_fd=fd)
