"""Prune: delete the packs no snapshot references, in two phases with a grace period (docs/format.md §15).

Phase 1 drops unreferenced packs from the index and records them, with the time, as deletion candidates in a
MAC'd `maintenance/` object; only a later prune past the grace period marks again and deletes what is still unused.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from . import maintenance
from .crypto import content_hash
from .durations import parse_duration
from .errors import IntegrityError, ObjectLocked, ObjectMissing, VaultflowError
from .index import Index, encode_index_file
from .maintenance import deletion_candidates  # noqa: F401 - re-exported: what backups and check ask
from .pack import PackEntry
from .prune_plan import ID, Plan, entry_columns, parse_max_unused
from .repository import Repository
from .snapshot import SnapshotRecord
from .upload import read_pack_trailer

DEFAULT_GRACE = 24 * 3600.0  # kopia's: a writer that loaded the index before phase 1 has a day to commit
KILL_AT = "VAULTFLOW_PRUNE_KILL_AT"  # test hook: SIGKILL this process at a named step, as a crash would there
KILL_POINTS = ("after-repack", "after-index", "after-candidates", "after-old-index", "mid-delete", "after-delete")
_PACKS_PER_INDEX = 256

__all__ = ["DEFAULT_GRACE", "Plan", "PruneRefused", "deletion_candidates", "execute", "mark", "parse_duration",
           "parse_max_unused", "plan", "prune", "reindex", "repack", "sweep"]


class PruneRefused(VaultflowError):
    """Prune found a repository it cannot judge safely (damage, missing data); it changed nothing."""


def _reached(point: str) -> None:
    if os.environ.get(KILL_AT) == point:
        os.kill(os.getpid(), signal.SIGKILL)


# -- mark: every chunk any snapshot references, one files table at a time --------------------------------------

def _chunk_ids(table: pa.Table) -> np.ndarray:
    flat = pc.drop_null(pc.list_flatten(table["chunks"]))
    arr = flat.combine_chunks() if isinstance(flat, pa.ChunkedArray) else flat
    if not len(arr):
        return np.empty(0, ID)
    return np.unique(np.frombuffer(arr.buffers()[1], ID, len(arr), arr.offset * 32))


def _merge(used: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Sorted union of two sorted unique id arrays; copies `used` only when `ids` brings new ones."""
    if not len(used):
        return ids
    pos = np.searchsorted(used, ids)
    new = ~((pos < len(used)) & (used[np.minimum(pos, len(used) - 1)] == ids))
    return np.insert(used, pos[new], ids[new]) if new.any() else used


def mark(repo: Repository, records: dict[str, SnapshotRecord] | None = None) -> np.ndarray:
    """Sorted unique ids of every chunk a snapshot record references. Streams over the records, so memory grows
    with the number of distinct chunks (32 bytes each), never with snapshots × files."""
    records = repo.snapshots() if records is None else records
    if repo.damaged_records:
        name, why = next((d.name, d.reason) for d in repo.damaged_records.values())
        raise PruneRefused(f"{name}: {why}; prune cannot tell what a damaged record references and changes "
                           "nothing: put it back from a copy of the repository, or quarantine it with `vaultflow "
                           "repair snapshots`, then prune again")
    used = np.empty(0, ID)
    for rid, record in sorted(records.items()):
        try:
            table = repo.files_table(record)
        except (VaultflowError, ValueError) as e:
            raise PruneRefused(f"snapshot {rid[:12]} ({record.source}#{record.serial}): its files table cannot be "
                               f"read ({e}); prune cannot tell what it references and changes nothing; run "
                               "`vaultflow check`") from None
        used = _merge(used, _chunk_ids(table))
        del table
    return used


# -- plan: what every pack holds for the snapshots --------------------------------------------------------------

def plan(repo: Repository, *, now: float | None = None, grace: float = DEFAULT_GRACE,
         max_unused: str = "5%") -> Plan:
    """Mark, then read every index file once (and the trailers of packs in none) and decide; changes nothing."""
    limit = parse_max_unused(max_unused)
    records = repo.snapshots()
    used = mark(repo, records)
    # Index files before packs: a pack a writer adds in between is then a leftover (a candidate, safe), never a
    # pack an index file lists and storage seems to lack.
    index_files = [name for name, _ in repo.backend.list("index")]
    p = Plan(time.time() if now is None else now, grace, used, dict(repo.backend.list("data")), len(records))
    p.candidates, p.candidate_objects, _ = maintenance.load(repo)
    for name in index_files:
        try:
            _scan_index_file(p, name, repo.read_index_file(name))
        except ObjectMissing:
            continue
        except IntegrityError as e:
            raise PruneRefused(f"{e}; prune needs every index file and changes nothing: run `vaultflow repair "
                               "index`, then prune again") from None
    for name in sorted(set(p.listed) - set(p.packs)):
        try:
            entries = read_pack_trailer(repo, name, p.listed[name])
        except (IntegrityError, ObjectMissing, OSError):
            p.unreadable.append(name)
            continue
        p.trailers[name] = entries
        no = p.number(name, p.listed[name], indexed=False)
        ids, length, btype = entry_columns(entries)
        p.add_entries(np.full(len(ids), no, np.int64), ids, length, btype)
    missing = p.choose_owners()
    if missing:
        lost = f" (the index lists lost packs: {', '.join(list(p.lost)[:3])})" if p.lost else ""
        raise PruneRefused(f"{missing} chunks that snapshots reference are in no pack in storage{lost}; prune "
                           "changes nothing while data is missing: run `vaultflow check` to see what is affected")
    p.decide(limit)
    return p


def _scan_index_file(p: Plan, name: str, cols: tuple[object, ...]) -> None:
    packs, ids, pack_no, _, length, _, btype = cols
    assert isinstance(packs, list) and isinstance(ids, np.ndarray) and isinstance(pack_no, np.ndarray)
    assert isinstance(length, np.ndarray) and isinstance(btype, np.ndarray)
    p.index_files[name] = packs
    numbers = np.full(len(packs), -1, np.int64)
    for i, pack in enumerate(packs):
        if pack not in p.listed:
            p.lost[pack] = None
        elif pack not in p.packs:  # a pack listed by several index files is counted once
            numbers[i] = p.number(pack, p.listed[pack], indexed=True)
    glob = numbers[pack_no] if len(pack_no) else np.empty(0, np.int64)
    sel = glob >= 0
    p.add_entries(glob[sel], ids[sel].view(ID).ravel(), length[sel], btype[sel])


# -- execute: new packs → new index → candidates → old index files go → candidates past grace go ----------------

def execute(repo: Repository, p: Plan, fence: Callable[[], None] | None = None) -> None:
    """Carry the plan out in an order that a crash at any moment leaves valid (check passes, every snapshot
    restores) and a re-run completes: new packs → new index files → candidates → old index files go → candidates
    past the grace period go → the candidates object is replaced. `fence` proves the exclusive lock is still held
    before anything is deleted."""
    repack(repo, p)
    reindex(repo, p)
    sweep(repo, p, fence)


def repack(repo: Repository, p: Plan) -> None:
    """Copy the blobs whose kept copy is in a repacked pack into new packs, and index them."""
    if p.repack:
        _repack(repo, p)
    _reached("after-repack")


def reindex(repo: Repository, p: Plan) -> None:
    """New index files (without the packs dropped, with the packs indexed again), then the candidates object that
    names every candidate, the ones about to be deleted included."""
    _rewrite_index(repo, p)
    _reached("after-index")
    p.written_objects = _write_candidates(repo, p.candidates_after(deleted=False))
    _reached("after-candidates")


def sweep(repo: Repository, p: Plan, fence: Callable[[], None] | None = None) -> None:
    """Delete the index files replaced, then the candidates past the grace period; the candidates object last."""
    prove = fence or (lambda: None)
    prove()
    for name in p.removed_index_files:
        _delete(repo, p, name)
    _reached("after-old-index")
    prove()
    for i, pack in enumerate(p.delete):
        _delete(repo, p, pack)
        if i == 0:
            _reached("mid-delete")
    _reached("after-delete")
    final = _write_candidates(repo, p.candidates_after(deleted=True))
    for name in sorted({*p.candidate_objects, *p.written_objects} - set(final)):
        _delete(repo, p, name)  # one left behind is harmless: readers take the union, the latest time winning
    repo.reload_index()


def _delete(repo: Repository, p: Plan, name: str) -> None:
    """Delete, or note the object as retained when S3 Object Lock refuses (a pack stays a candidate; an index file
    that still lists a dropped pack makes the next prune mark it again): pending, not an error (format §14)."""
    try:
        repo.backend.delete(name)
    except ObjectLocked:
        p.retained.append(name)


def prune(repo: Repository, *, now: float | None = None, grace: float = DEFAULT_GRACE, max_unused: str = "5%",
          dry_run: bool = False, fence: Callable[[], None] | None = None) -> Plan:
    """Plan and (unless `dry_run`) execute; the caller holds the exclusive lock (a shared one for a dry run)."""
    p = plan(repo, now=now, grace=grace, max_unused=max_unused)
    if not dry_run:
        execute(repo, p, fence)
    return p


def _repack(repo: Repository, p: Plan) -> None:
    repo.use_index(Index())  # the session indexes only what it writes: prune never loads the whole index
    session = repo.write_session()
    copied: set[bytes] = set()
    try:
        packer = session.packer()
        for name in p.repack:
            reader, entries, data = repo.read_pack(name)  # hash-checked against its name
            ids, _, _ = entry_columns(entries)
            view = memoryview(data)
            for entry, mine in zip(entries, p.owns(name, ids).tolist(), strict=True):
                if mine and entry.id not in copied:
                    blob = reader.blob(view[entry.offset:entry.offset + entry.length], entry)
                    repo.verify_chunk(blob, entry, name)
                    packer.add(entry.id, entry.type, blob)
                    copied.add(entry.id)
        session.flush()
        p.new_index_files.extend(session.write_index())
    finally:
        session.close()
        repo.reload_index()


def _rewrite_index(repo: Repository, p: Plan) -> None:
    """New index files for the packs that stay listed in an index file about to go, and for the packs indexed
    again; an index file goes when it lists a pack dropped from the index."""
    gone, relist = p.index_files_to_replace()
    p.removed_index_files = gone
    batch: dict[str, list[PackEntry]] = {}
    done: set[str] = set()
    for f in gone:
        if not relist.intersection(p.index_files[f]) - done:
            continue
        packs, ids, pack_no, offset, length, raw, btype = repo.read_index_file(f)
        for i, pack in enumerate(packs):
            if pack in relist and pack not in done:
                batch[pack] = [PackEntry(ids[r].tobytes(), int(btype[r]), int(offset[r]), int(length[r]),
                                         int(raw[r])) for r in np.flatnonzero(pack_no == i).tolist()]
                done.add(pack)
                if len(batch) >= _PACKS_PER_INDEX:
                    _write_index_file(repo, p, batch)
    for pack in p.reindex:
        batch[pack] = p.trailers[pack]
        if len(batch) >= _PACKS_PER_INDEX:
            _write_index_file(repo, p, batch)
    _write_index_file(repo, p, batch)


def _write_index_file(repo: Repository, p: Plan, batch: dict[str, list[PackEntry]]) -> None:
    if batch:
        data = encode_index_file(repo.master.index_key, batch)
        name = f"index/{content_hash(data)}"
        repo.backend.write(name, data, content_named=True)
        p.new_index_files.append(name)
        batch.clear()


def _write_candidates(repo: Repository, packs: dict[str, str]) -> list[str]:
    if not packs:
        return []
    name, data = maintenance.encode(repo, packs)
    repo.backend.write(name, data, content_named=True)
    return [name]
