"""Prune's plan: per pack what the snapshots use of it, one kept copy per used chunk, and what becomes of each pack.

Pure bookkeeping over numpy columns: storage/prune.py reads the repository and carries the plan out.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .errors import VaultflowError
from .maintenance import iso, seconds
from .pack import BlobType, PackEntry

ID = np.dtype("S32")  # a chunk id as one sortable 32-byte value (compared as raw bytes)


def parse_max_unused(text: str) -> Callable[[int], float]:
    """restic's --max-unused: `N%` (after prune, unused blob bytes ≤ N % of all blob bytes in kept packs), a size
    (`500M`, `2G`: at most that many unused bytes), or `unlimited` (never repack)."""
    t = text.strip().lower()
    if t == "unlimited":
        return lambda used: math.inf
    m = re.fullmatch(r"(\d+(?:\.\d*)?)\s*(%|[kmgt]?)(?:i?b)?", t)
    if m is None:
        raise VaultflowError(f"--max-unused {text!r}: use N% (e.g. 5%), a size (e.g. 500M) or unlimited")
    value = float(m.group(1))
    if m.group(2) == "%":
        if not value < 100:
            raise VaultflowError(f"--max-unused {text}: the percentage must be below 100%")
        return lambda used: value / (100 - value) * used
    size = value * (1 << (10 * " kmgt".index(m.group(2) or " ")))
    return lambda used: size


def positions(used: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(position in the sorted `used`, whether it is there) of each id."""
    if not len(used):
        return np.zeros(len(ids), np.int64), np.zeros(len(ids), bool)
    pos = np.searchsorted(used, ids)
    return pos, (pos < len(used)) & (used[np.minimum(pos, len(used) - 1)] == ids)


def entry_columns(entries: list[PackEntry]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, stored lengths, types) of trailer entries."""
    ids = np.frombuffer(b"".join(e.id for e in entries), ID) if entries else np.empty(0, ID)
    return ids, np.array([e.length for e in entries], np.int64), np.array([e.type for e in entries], np.uint8)


@dataclass
class PackInfo:
    name: str
    size: int  # bytes in storage
    indexed: bool
    blobs: int = 0
    blob_bytes: int = 0  # stored bytes of its blobs
    hit_bytes: int = 0  # of its blobs that a snapshot uses, copies elsewhere included
    used_bytes: int = 0  # of the blobs whose kept copy is this one
    used_blobs: int = 0
    pinned: bool = False  # holds blobs of another type than data chunks: never dropped nor repacked


class Plan:
    """What prune found and decided. A plain class, not a model: it holds numpy arrays and stays in one process."""

    def __init__(self, now: float, grace: float, used: np.ndarray, listed: dict[str, int], snapshots: int) -> None:
        self.now, self.grace, self.used, self.listed, self.snapshots = now, grace, used, listed, snapshots
        self.packs: dict[str, PackInfo] = {}
        self.names: list[str] = []  # pack numbers, as `owner` uses them
        self.owner = np.full(len(used), -1, np.int64)  # per used chunk: the pack whose copy is kept
        self.index_files: dict[str, list[str]] = {}  # index file → the packs it lists
        self.lost: dict[str, None] = {}  # listed by an index file, gone from storage (none of their chunks needed)
        self.unreadable: list[str] = []  # in no index file, trailer unreadable: left alone (check reports it)
        self.trailers: dict[str, list[PackEntry]] = {}  # packs in no index file
        self.candidates: dict[str, str] = {}  # before this run
        self.candidate_objects: list[str] = []
        self.keep: list[str] = []
        self.repack: list[str] = []  # partly used: used blobs copied to new packs, then marked
        self.mark: list[str] = []  # unused: candidates from now on (dropped from the index where listed)
        self.reindex: list[str] = []  # in no index file, yet referenced: indexed again and kept
        self.delete: list[str] = []  # candidates past the grace period and unreferenced at this mark
        self.pending: list[str] = []  # candidates still within the grace period
        self.new_index_files: list[str] = []
        self.removed_index_files: list[str] = []
        self.written_objects: list[str] = []  # candidates objects this run wrote
        self.retained: list[str] = []  # deletes that S3 Object Lock refused: pending until retention ends
        self._hits: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (position in used, pack no, length)

    def number(self, name: str, size: int, indexed: bool) -> int:
        self.packs[name] = PackInfo(name, size, indexed)
        self.names.append(name)
        return len(self.names) - 1

    def add_entries(self, numbers: np.ndarray, ids: np.ndarray, length: np.ndarray, btype: np.ndarray) -> None:
        """Count a batch of index or trailer entries (`numbers`: their packs) and remember the used ones."""
        pos, hit = positions(self.used, ids)
        for no in np.unique(numbers).tolist():
            mine = numbers == no
            info = self.packs[self.names[no]]
            info.blobs += int(mine.sum())
            info.blob_bytes += int(length[mine].sum())
            info.hit_bytes += int(length[mine & hit].sum())
            info.pinned |= bool((btype[mine] != BlobType.DATA).any())
        self._hits.append((pos[hit], numbers[hit].astype(np.int64), length[hit].astype(np.int64)))

    def choose_owners(self) -> int:
        """One kept copy per used chunk: in an indexed pack first, then in the pack with the largest used share
        (a repacked copy wins over the partly used original), then by name. Returns how many used chunks have no
        copy in any readable pack in storage."""
        empty = np.empty(0, np.int64)
        pos, pk, ln = (np.concatenate([h[i] for h in self._hits] or [empty]) for i in range(3))
        self._hits = []
        infos = [self.packs[n] for n in self.names]
        if len(pos):
            share = np.array([i.hit_bytes / i.blob_bytes if i.blob_bytes else 0.0 for i in infos])
            unindexed = np.array([not i.indexed for i in infos], bool)
            rank = np.argsort(np.argsort(np.array(self.names)))
            order = np.lexsort((rank[pk], -share[pk], unindexed[pk], pos))
            win = order[np.r_[True, pos[order][1:] != pos[order][:-1]]]
            self.owner[pos[win]] = pk[win]
            by_bytes = np.bincount(pk[win], weights=ln[win], minlength=len(infos)).tolist()
            by_count = np.bincount(pk[win], minlength=len(infos)).tolist()
            for info, nbytes, count in zip(infos, by_bytes, by_count, strict=True):
                info.used_bytes, info.used_blobs = int(nbytes), int(count)
        return int((self.owner < 0).sum())

    def owns(self, pack: str, ids: np.ndarray) -> np.ndarray:
        """Whether `pack` holds the kept copy of each id."""
        pos, hit = positions(self.used, ids)
        mine: np.ndarray = self.owner[np.minimum(pos, max(len(self.used) - 1, 0))] == self.names.index(pack)
        both: np.ndarray = hit & mine
        return both

    def decide(self, max_unused: Callable[[int], float]) -> None:
        for info in sorted(self.packs.values(), key=lambda i: i.name):
            since = self.candidates.get(info.name)
            if info.pinned or info.used_blobs:
                (self.keep if info.indexed else self.reindex).append(info.name)
            elif info.indexed or since is None:  # a candidate found in an index file was visible: time restarts
                self.mark.append(info.name)
            elif self.now - seconds(since) >= self.grace:
                self.delete.append(info.name)
            else:
                self.pending.append(info.name)
        self._choose_repacks(max_unused)
        self.removed_index_files = self.index_files_to_replace()[0]

    def _choose_repacks(self, max_unused: Callable[[int], float]) -> None:
        """restic's rule: packs with the largest unused share first, until the unused bytes left in kept packs are
        below the limit, which `max_unused` computes from the used bytes."""
        kept = [self.packs[n] for n in self.keep]
        partly = [i for i in kept if not i.pinned and i.used_bytes < i.blob_bytes]
        unused = sum(i.blob_bytes - i.used_bytes for i in partly)
        limit = max_unused(sum(i.used_bytes for i in kept) + sum(self.packs[n].used_bytes for n in self.reindex))
        for info in sorted(partly, key=lambda i: (i.used_bytes / i.blob_bytes, i.name)):
            if unused < limit:
                break
            self.repack.append(info.name)
            unused -= info.blob_bytes - info.used_bytes
        chosen = set(self.repack)
        self.keep = [n for n in self.keep if n not in chosen]

    def dropped_from_index(self) -> set[str]:
        return set(self.lost) | set(self.repack) | {n for n in self.mark if self.packs[n].indexed}

    def index_files_to_replace(self) -> tuple[list[str], set[str]]:
        """(index files that go: each lists a pack dropped from the index; the packs they list that no other
        index file lists and that stay: a new index file lists those)."""
        drop = self.dropped_from_index()
        gone = [f for f, packs in self.index_files.items() if drop.intersection(packs)]
        covered = {pack for f, packs in self.index_files.items() if f not in set(gone) for pack in packs}
        return gone, {pack for f in gone for pack in self.index_files[f]} - drop - covered

    def candidates_after(self, deleted: bool) -> dict[str, str]:
        """The candidates once this run is through (`deleted`) or before its deletions: those are listed until
        they are gone, so a crash between never leaves them as leftovers that a backup would adopt."""
        old = self.candidates
        out = {n: old[n] for n in self.pending + [u for u in self.unreadable if u in old]}
        out.update({n: old[n] for n in self.delete if not deleted or n in self.retained})
        out.update({n: iso(self.now) for n in self.mark + self.repack})
        return out

    def summary(self) -> dict[str, int]:
        def size(names: list[str]) -> int:
            return sum(self.packs[n].size for n in names)

        deleted = [n for n in self.delete if n not in self.retained]
        return {"snapshots": self.snapshots, "chunks_used": len(self.used), "packs": len(self.packs),
                "packs_kept": len(self.keep), "packs_repacked": len(self.repack),
                "packs_marked": len(self.mark) + len(self.repack), "packs_reindexed": len(self.reindex),
                "packs_deleted": len(deleted), "packs_retained": len(self.delete) - len(deleted),
                "packs_pending": len(self.pending), "packs_lost_forgotten": len(self.lost),
                "packs_unreadable": len(self.unreadable), "bytes_total": size(list(self.packs)),
                "bytes_freed": size(deleted), "bytes_marked": size(self.mark) + size(self.repack),
                "bytes_pending": size(self.pending), "bytes_copied": sum(self.packs[n].used_bytes for n in self.repack),
                "index_files_rewritten": len(self.removed_index_files)}
