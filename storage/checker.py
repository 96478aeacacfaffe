"""Repository checks: structure (records, chain, manifests, index, packs) and data (read and authenticate packs).

Every problem names the damaged object, and `affected` says which snapshots and files it touches.
"""

from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from . import manifest
from .crypto import content_hash
from .errors import IntegrityError, NotARepository, ObjectMissing, VaultflowError
from .index import Index, encode_index_file
from .lock import STALE_AFTER
from .maintenance import deletion_candidates
from .pack import PackEntry
from .repository import CONFIG, RepoConfig, Repository
from .snapshot import SnapshotRecord, chain_problems, decode_record, forgotten
from .upload import read_pack_trailer, trailers


@dataclass
class Problem:
    kind: str  # snapshot, chain, manifest, index, pack, chunk, key, config, table
    object: str
    message: str
    snapshots: list[str] = field(default_factory=list)  # ids of affected snapshots
    files: list[str] = field(default_factory=list)  # affected paths, "source#serial:path", at most 50


@dataclass
class CheckReport:
    snapshots: int = 0
    index_files: int = 0
    packs: int = 0
    chunks: int = 0
    packs_read: int = 0
    bytes_read: int = 0
    problems: list[Problem] = field(default_factory=list)
    # What an interrupted run leaves (packs in no index file, partial uploads): reported, never damage. Data
    # that a snapshot needs and cannot find is a problem of its own (kind "chunk"), whatever the cause.
    notices: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


class Checker:
    """Builds its own view of the repository from storage; never trusts the cached index."""

    def __init__(self, repo: Repository) -> None:
        self.repo = repo
        self.report = CheckReport()
        self.records: dict[str, SnapshotRecord] = {}  # every authenticated record: tombstones, forgotten ones
        self.forgotten: set[str] = set()  # records a tombstone removed that are still stored
        self.index = Index()
        self.pack_sizes: dict[str, int] = {}
        self._bad_chunks: dict[bytes, str] = {}  # chunk id -> name of the damaged object that held it
        self._candidate_index: Index | None = None  # prune's deletion candidates, indexed on the first miss

    # -- structure -----------------------------------------------------------------------------------------

    def structure(self) -> CheckReport:
        self._records()
        self._index_files()
        self._packs()
        self._manifests()
        self._keys()
        self._config()
        self._snapshot_tables()
        return self.report

    def _problem(self, kind: str, obj: str, message: str) -> Problem:
        p = Problem(kind, obj, message)
        self.report.problems.append(p)
        return p

    def _records(self) -> None:
        for name, _ in self.repo.backend.list("snapshots"):
            rid = name.rsplit("/", 1)[-1]
            try:
                self.records[rid] = decode_record(self.repo.master.record_key, self.repo.backend.read(name), name, rid)
            except (IntegrityError, ObjectMissing) as e:
                self._problem("snapshot", name, str(e))
        gone = forgotten(self.records)
        self.forgotten = {rid for rid in self.records if rid in gone}
        self.report.snapshots = sum(1 for rid, r in self.records.items() if not r.is_tombstone and rid not in gone)
        for message in chain_problems(self.records):
            self._problem("chain", message.split(":", 1)[0], message)
        for name, _ in self.repo.backend.list("quarantine/snapshots"):
            self.report.notices.append(Problem("quarantined", name, "a damaged snapshot record that `repair "
                                               "snapshots` moved out of snapshots/ (kept for inspection only)"))
        for rid in sorted(self.forgotten):
            tomb = self.records[gone[rid][0]]
            self.report.notices.append(Problem("forgotten", f"snapshots/{rid}", (
                f"{tomb.source}#{self.records[rid].serial} was forgotten by tombstone {gone[rid][0][:12]} "
                f"(policy: {(tomb.tombstone or {}).get('policy', '?')}) and is still stored: an interrupted forget; "
                "the next `vaultflow forget` deletes it")))

    def _index_files(self) -> None:
        for name, _ in self.repo.backend.list("index"):
            try:
                self.index.add_columns(*self.repo.read_index_file(name))
                self.report.index_files += 1
            except (IntegrityError, ObjectMissing) as e:
                self._problem("index", name, f"{e}; its packs are still readable: `vaultflow repair index` "
                                             "rebuilds the index from pack trailers")
        self.report.chunks = len(self.index)

    def _packs(self) -> None:
        self.pack_sizes = dict(self.repo.backend.list("data"))
        self.report.packs = len(self.pack_sizes)
        ends: dict[str, int] = {}
        lost: dict[str, list[bytes]] = {}
        for pack, entry in self.index.entries():
            ends[pack] = max(ends.get(pack, 0), entry.offset + entry.length)
            if pack not in self.pack_sizes:
                lost.setdefault(pack, []).append(entry.id)
        for pack, ids in sorted(lost.items()):
            self._problem("pack", pack, f"pack is missing: the index lists {len(ids)} chunks in it")
            self._bad_chunks.update((cid, pack) for cid in ids)
        for pack, end in sorted(ends.items()):
            size = self.pack_sizes.get(pack)
            if size is not None and end > size:
                self._problem("pack", pack, f"pack is truncated: {size} bytes, the index needs {end}")
                self._mark_pack_bad(pack)
        indexed = self.index.pack_set()
        candidates = deletion_candidates(self.repo)
        for pack in sorted(set(self.pack_sizes) - indexed):
            if pack in candidates:
                self.report.notices.append(Problem("pack", pack, f"deletion candidate since {candidates[pack]}: "
                                                   "a later prune deletes it after the grace period unless a "
                                                   "snapshot uses it again"))
                continue
            self.report.notices.append(Problem("pack", pack, "pack is in no index file (an interrupted backup's "
                                               "leftover): the next backup adopts it, `vaultflow repair index` "
                                               "indexes it"))
        for name, age in self.repo.backend.temporaries("data"):
            self.report.notices.append(Problem("upload", name, f"partial upload left by an interrupted run "
                                               f"({age / 60:.0f} min old): the next backup removes it once it is "
                                               f"older than {STALE_AFTER / 60:.0f} min"))

    def _mark_pack_bad(self, pack: str) -> None:
        for p, entry in self.index.entries():
            if p == pack:
                self._bad_chunks[entry.id] = pack

    def _manifests(self) -> None:
        """Each record's manifests hash to what it says; every chunk they reference is indexed."""
        for rid, record in sorted(self.records.items(), key=lambda kv: (kv[1].source, kv[1].serial)):
            if record.is_tombstone or rid in self.forgotten:
                continue  # a forgotten snapshot's data may already be pruned: nothing needs it
            for name, digest in record.manifests.items():
                try:
                    self.repo.read_object(name, digest)
                except (IntegrityError, ObjectMissing) as e:
                    p = self._problem("manifest", name, str(e))
                    p.snapshots.append(rid)
            try:
                table = self.repo.files_table(record)
            except (IntegrityError, ObjectMissing, VaultflowError, ValueError):
                continue  # reported above
            chunks = pc.list_flatten(table["chunks"]).unique().to_pylist()
            missing = [c for c, ok in zip(chunks, self.index.contains_many(chunks), strict=True) if not ok]
            held = [c for c in missing if self._in_candidate(c)]
            if held:  # a writer with a stale view referenced them; nothing is lost, readers find them there
                self.report.notices.append(Problem("chunk", f"snapshot {rid[:12]}", (
                    f"{len(held)} chunks referenced by {record.source}#{record.serial} are only in prune's "
                    "deletion candidates: the next prune indexes those packs again and keeps them")))
                missing = [c for c in missing if c not in set(held)]
            if missing:
                p = self._problem("chunk", f"snapshot {rid[:12]}", f"{len(missing)} chunks referenced by "
                                  f"{record.source}#{record.serial} are in no index file")
                p.snapshots.append(rid)
                self._bad_chunks.update((c, "index") for c in missing)

    def _in_candidate(self, chunk: bytes) -> bool:
        """Whether a prune deletion candidate's trailer holds `chunk` (read once, on the first miss)."""
        if self._candidate_index is None:
            self._candidate_index = Index()
            candidates = deletion_candidates(self.repo)
            sizes = {p: n for p, n in self.pack_sizes.items() if p in candidates}
            for pack, entries in trailers(self.repo, sizes, set()).items():
                self._candidate_index.add(pack, entries)
        return self._candidate_index.lookup(chunk) is not None

    def _keys(self) -> None:
        """Every key file, not only the one that opened: checksum, fields, KDF bounds, and its sealed info
        authenticated with the master key (so a forged or foreign key file is found without its password)."""
        for info in self.repo.describe_keys():
            if info.problem is not None:
                self._problem("key", info.name, f"{info.problem}; remove it with `vaultflow key remove "
                                                f"{info.id}` once another password opens the repository")

    def _config(self) -> None:
        try:
            RepoConfig.decode(self.repo.backend.read(CONFIG), self.repo.master.config_key)
        except (IntegrityError, ObjectMissing, NotARepository) as e:
            self._problem("config", CONFIG, str(e))

    def _forgotten_serials(self) -> set[tuple[str, int]]:
        return {(r.source, serial) for r in self.records.values() for serial in r.removed().values()}

    def _snapshot_tables(self) -> None:
        """`tables/snapshots` rows are written after the commit and no record hashes them: each must agree with
        the authenticated record of its source and serial, or it is tampering (or an orphan)."""
        for name, size in self.repo.backend.list("tables/snapshots"):
            m = _SNAPSHOT_TABLE.match(name)
            if m is None:
                self._problem("table", name, "unexpected object in tables/snapshots (not a snapshot row)")
                continue
            source, serial = m.group(1), int(m.group(2))
            mine = {rid: r for rid, r in self.records.items() if r.source == source and r.serial == serial}
            if not mine and (source, serial) in self._forgotten_serials():
                self.report.notices.append(Problem("forgotten", name, "row of a forgotten snapshot, left by an "
                                                   "interrupted forget; the next `vaultflow forget` deletes it"))
                continue
            if not mine:
                self._problem("table", name, f"orphan row: no authenticated snapshot record of source {source!r} "
                                             f"serial {serial}; the row is not backed by any backup")
                continue
            try:
                if size > _MAX_TABLE:
                    raise IntegrityError(name, f"{size} bytes, far more than one row's")
                rows = manifest.from_parquet(self.repo.backend.read(name), manifest.SNAPSHOTS_SCHEMA, name).to_pylist()
            except (IntegrityError, ObjectMissing, KeyError, ValueError, TypeError, pa.ArrowException) as e:
                self._problem("table", name, f"snapshot row is unreadable ({e})")
                continue
            expected = {rid: manifest.snapshot_row(rid, r).to_pylist()[0] for rid, r in mine.items()}
            if len(rows) != 1 or rows[0] not in expected.values():
                got = rows[0] if len(rows) == 1 else {}
                want = next(iter(expected.values()))
                differ = sorted(k for k in want if got.get(k) != want[k]) if got else [f"{len(rows)} rows"]
                p = self._problem("table", name, f"snapshot row disagrees with the authenticated record of "
                                  f"{source}#{serial} ({', '.join(differ)}): tampered; the record is the truth")
                p.snapshots.extend(sorted(mine))

    # -- data ----------------------------------------------------------------------------------------------

    def select_packs(self, subset: str | None) -> list[str]:
        """All packs, `N%` at random, or the deterministic slice `K/N` (so N runs cover every pack)."""
        packs = sorted(self.pack_sizes or dict(self.repo.backend.list("data")))
        if not subset:
            return packs
        if subset.endswith("%"):
            share = float(subset[:-1])
            if not 0 < share <= 100:
                raise VaultflowError(f"--read-data-subset {subset}: the percentage must be in (0, 100]")
            return sorted(random.sample(packs, max(1, round(len(packs) * share / 100)) if packs else 0))
        try:
            k, n = (int(x) for x in subset.split("/"))
        except ValueError:
            raise VaultflowError(f"--read-data-subset {subset!r}: use N% or K/N (e.g. 2/7)") from None
        if not 1 <= k <= n:
            raise VaultflowError(f"--read-data-subset {subset}: K must be between 1 and N")
        return [p for p in packs if int(p.rsplit("/", 1)[-1][:8], 16) % n == k - 1]

    def read_packs(self, packs: list[str]) -> list[Problem]:
        """Read and authenticate whole packs here (see `read_packs` for reading them anywhere)."""
        damaged, nbytes = read_packs(self.repo, packs)
        return self.record_read(len(packs), nbytes, damaged)

    def record_read(self, packs_read: int, nbytes: int, damaged: list[tuple[str, str]]) -> list[Problem]:
        """Count packs that `read_packs` read (perhaps in another process) and record the damaged ones."""
        found = [Problem("pack", pack, message) for pack, message in damaged]
        for pack, _ in damaged:
            self._mark_pack_bad(pack)
        self.report.packs_read += packs_read
        self.report.bytes_read += nbytes
        self.report.problems.extend(found)
        return found

    # -- what the damage touches ---------------------------------------------------------------------------

    def affected(self, limit: int = 50) -> None:
        """Fill in, for each pack/index/chunk problem, the snapshots and files that reference damaged chunks."""
        if not self._bad_chunks:
            return
        bad = pa.array(list(self._bad_chunks), pa.binary(32))
        by_object: dict[str, tuple[set[str], list[str]]] = {}
        for rid, record in sorted(self.records.items(), key=lambda kv: (kv[1].source, kv[1].serial)):
            try:
                table = self.repo.files_table(record)
            except (VaultflowError, ValueError):
                continue
            flat = pc.list_flatten(table["chunks"])
            rows = pc.list_parent_indices(table["chunks"])
            hit = pc.is_in(flat, value_set=bad)
            if not pc.any(hit).as_py():
                continue
            for row, cid in zip(pc.filter(rows, hit).to_pylist(), pc.filter(flat, hit).to_pylist(), strict=True):
                obj = self._bad_chunks[cid]
                snaps, files = by_object.setdefault(obj, (set(), []))
                snaps.add(rid)
                entry = f"{record.source}#{record.serial}:{table['path'][row].as_py()}"
                if len(files) < limit and entry not in files:
                    files.append(entry)
        for problem in self.report.problems:
            key = problem.object if problem.kind == "pack" else "index" if problem.kind in ("chunk", "index") \
                else None
            if key in by_object:
                snaps, files = by_object[key]
                problem.snapshots = sorted(set(problem.snapshots) | snaps)
                problem.files = files


_SNAPSHOT_TABLE = re.compile(r"^tables/snapshots/source=([^/]+)/snapshot=([1-9][0-9]{0,18})/snapshot\.parquet$")
_MAX_TABLE = 1 << 20


def read_packs(repo: Repository, packs: list[str]) -> tuple[list[tuple[str, str]], int]:
    """Read and authenticate whole packs — content hash, trailer, every blob and its chunk id — needing nothing
    but the open repository (no index): (damaged packs with what is wrong, bytes read)."""
    damaged: list[tuple[str, str]] = []
    nbytes = 0
    for pack in packs:
        try:
            reader, entries, data = repo.read_pack(pack)
            nbytes += len(data)
            view = memoryview(data)
            for entry in entries:
                repo.verify_chunk(reader.blob(view[entry.offset:entry.offset + entry.length], entry), entry, pack)
        except (IntegrityError, ObjectMissing) as e:
            damaged.append((pack, str(e)))
    return damaged, nbytes


def rebuild_index(repo: Repository) -> tuple[int, int, list[str]]:
    """`repair index`: one new index file from every readable pack trailer; then the old index files go.

    Returns (packs indexed, chunks indexed, packs whose trailer could not be read).
    """
    by_pack: dict[str, list[PackEntry]] = {}
    unreadable = []
    for name, size in repo.backend.list("data"):
        try:
            by_pack[name] = read_pack_trailer(repo, name, size)
        except (IntegrityError, ObjectMissing, OSError):
            unreadable.append(name)
    old = [name for name, _ in repo.backend.list("index")]
    data = encode_index_file(repo.master.index_key, by_pack)
    new = f"index/{content_hash(data)}"
    repo.backend.write(new, data, content_named=True)
    for name in old:  # only after the new index is durable
        if name != new:
            repo.backend.delete(name)
    repo.reload_index()
    return len(by_pack), sum(len(v) for v in by_pack.values()), unreadable
