"""The blob index: blob id → (pack, offset, length), in sorted numpy columns of 57 bytes per entry.

Index files (`index/<hash>`) are immutable, encrypted, and rebuildable from pack trailers alone.
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Iterable, Iterator

import numpy as np
import zstandard

from .crypto import Sealer, object_key
from .errors import IntegrityError
from .pack import PackEntry, decompress_bounded

MAGIC = b"VFIX"
VERSION = 1
HEADER = struct.Struct("<4sB3x32s")  # magic, version, salt
COUNTS = struct.Struct("<II")  # packs, entries
AAD = b"vaultflow index v1"
_MERGE_AT = 65536  # pending entries kept in a dict before they are merged into the sorted columns
ROW_SIZE = 32 + 4 * 4 + 1  # id, pack number, offset, stored length, raw length, type
# Honest plain bodies are mostly random 32-byte ids, which zstd cannot shrink: they compress by well under 2x.
# A body claiming more than this ratio (or a frame expanding beyond it) is a decompression bomb.
MAX_RATIO = 8
MIN_CAP = 1 << 16


def _prefix_keys(ids: np.ndarray) -> np.ndarray:
    """The first 8 bytes of each 32-byte id as a big-endian uint64: sort and search keys."""
    return ids[:, :8].copy().view(">u8").ravel().astype(np.uint64)


class Index:
    """An in-memory index of every blob; thread-safe for concurrent lookups and additions."""

    def __init__(self) -> None:
        self.packs: list[str] = []  # pack names, referenced by number
        self._pack_no: dict[str, int] = {}
        self._keys = np.empty(0, np.uint64)
        self._ids = np.empty((0, 32), np.uint8)
        self._pack = np.empty(0, np.uint32)
        self._offset = np.empty(0, np.uint32)
        self._length = np.empty(0, np.uint32)
        self._raw = np.empty(0, np.uint32)
        self._type = np.empty(0, np.uint8)
        self._pending: dict[bytes, tuple[int, int, int, int, int]] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._keys) + len(self._pending)

    def pack_number(self, pack: str) -> int:
        with self._lock:
            return self._pack_number(pack)

    def _pack_number(self, pack: str) -> int:
        no = self._pack_no.get(pack)
        if no is None:
            no = self._pack_no[pack] = len(self.packs)
            self.packs.append(pack)
        return no

    def add(self, pack: str, entries: Iterable[PackEntry]) -> None:
        with self._lock:
            no = self._pack_number(pack)
            for e in entries:
                self._pending.setdefault(e.id, (no, e.offset, e.length, e.raw_length, e.type))
            if len(self._pending) >= _MERGE_AT:
                self._merge()

    def add_columns(self, packs: list[str], ids: np.ndarray, pack_no: np.ndarray, offset: np.ndarray,
                    length: np.ndarray, raw: np.ndarray, btype: np.ndarray) -> None:
        """Bulk-add decoded index file columns (pack numbers relative to `packs`)."""
        with self._lock:
            remap = np.array([self._pack_number(p) for p in packs], np.uint32)
            self._append(ids, remap[pack_no] if len(packs) else pack_no, offset, length, raw, btype)

    def _merge(self) -> None:
        if not self._pending:
            return
        items = list(self._pending.items())
        self._pending = {}
        ids = np.frombuffer(b"".join(k for k, _ in items), np.uint8).reshape(-1, 32)
        cols = np.array([v for _, v in items], np.uint64)
        self._append(ids, cols[:, 0].astype(np.uint32), cols[:, 1].astype(np.uint32),
                     cols[:, 2].astype(np.uint32), cols[:, 3].astype(np.uint32), cols[:, 4].astype(np.uint8))

    def _append(self, ids: np.ndarray, pack_no: np.ndarray, offset: np.ndarray, length: np.ndarray,
                raw: np.ndarray, btype: np.ndarray) -> None:
        keys = np.concatenate([self._keys, _prefix_keys(ids)])
        order = np.argsort(keys, kind="stable")
        self._keys = keys[order]
        self._ids = np.concatenate([self._ids, ids])[order]
        self._pack = np.concatenate([self._pack, pack_no])[order]
        self._offset = np.concatenate([self._offset, offset])[order]
        self._length = np.concatenate([self._length, length])[order]
        self._raw = np.concatenate([self._raw, raw])[order]
        self._type = np.concatenate([self._type, btype])[order]

    def _find(self, blob_id: bytes) -> int:
        """Row of `blob_id` in the sorted columns, or -1."""
        key = np.uint64(int.from_bytes(blob_id[:8], "big"))
        row = int(np.searchsorted(self._keys, key))
        target = np.frombuffer(blob_id, np.uint8)
        while row < len(self._keys) and self._keys[row] == key:
            if np.array_equal(self._ids[row], target):
                return row
            row += 1
        return -1

    def lookup(self, blob_id: bytes) -> tuple[str, PackEntry] | None:
        with self._lock:
            hit = self._pending.get(blob_id)
            if hit is not None:
                no, offset, length, raw, btype = hit
                return self.packs[no], PackEntry(blob_id, btype, offset, length, raw)
            row = self._find(blob_id)
            if row < 0:
                return None
            entry = PackEntry(blob_id, int(self._type[row]), int(self._offset[row]), int(self._length[row]),
                              int(self._raw[row]))
            return self.packs[int(self._pack[row])], entry

    def __contains__(self, blob_id: bytes) -> bool:
        with self._lock:
            return blob_id in self._pending or self._find(blob_id) >= 0

    def contains_many(self, blob_ids: list[bytes]) -> list[bool]:
        """Membership of many ids at once (vectorised over the sorted columns)."""
        if not blob_ids:
            return []
        with self._lock:
            if not len(self._keys):  # nothing merged yet (a first backup): the dict answers alone
                return [bid in self._pending for bid in blob_ids]
            q = np.frombuffer(b"".join(blob_ids), np.uint8).reshape(-1, 32)
            keys = _prefix_keys(q)
            hit = np.zeros(len(q), bool)
            if len(self._keys):
                rows = np.minimum(np.searchsorted(self._keys, keys), len(self._keys) - 1)
                hit = (self._keys[rows] == keys) & (self._ids[rows] == q).all(axis=1)
            out: list[bool] = hit.tolist()
            for i in np.flatnonzero(~hit).tolist():  # pending entries and (rare) shared 8-byte prefixes
                out[i] = blob_ids[i] in self._pending or self._find(blob_ids[i]) >= 0
            return out

    def entries(self) -> Iterator[tuple[str, PackEntry]]:
        """Every (pack, entry), sorted by id (pending entries merged first)."""
        with self._lock:
            self._merge()
            snapshot = (self._ids, self._pack, self._offset, self._length, self._raw, self._type, list(self.packs))
        ids, pack, offset, length, raw, btype, packs = snapshot
        for i in range(len(ids)):
            yield packs[int(pack[i])], PackEntry(ids[i].tobytes(), int(btype[i]), int(offset[i]), int(length[i]),
                                                 int(raw[i]))

    def pack_set(self) -> set[str]:
        with self._lock:
            self._merge()
            return {self.packs[int(n)] for n in np.unique(self._pack)}

    def drop_packs(self, gone: set[str]) -> int:
        """Forget every entry in the packs `gone` (lost from storage), so lookups find another copy or none and
        a backup stores those chunks again; returns how many entries were dropped."""
        with self._lock:
            self._merge()
            numbers = [self._pack_no[p] for p in gone if p in self._pack_no]
            if not numbers:
                return 0
            keep = ~np.isin(self._pack, np.array(numbers, np.uint32))
            dropped = int(len(keep) - keep.sum())
            self._keys, self._ids, self._pack = self._keys[keep], self._ids[keep], self._pack[keep]
            self._offset, self._length = self._offset[keep], self._length[keep]
            self._raw, self._type = self._raw[keep], self._type[keep]
            return dropped


def encode_index_file(index_key: bytes, by_pack: dict[str, list[PackEntry]], level: int = 3) -> bytes:
    """Serialise entries of some packs into an encrypted index file."""
    packs = sorted(by_pack)
    rows = [(no, e) for no, p in enumerate(packs) for e in by_pack[p]]
    ids = b"".join(e.id for _, e in rows)
    pack_no = np.array([no for no, _ in rows], "<u4")
    cols = [np.array([getattr(e, f) for _, e in rows], "<u4") for f in ("offset", "length", "raw_length")]
    btype = np.array([e.type for _, e in rows], np.uint8)
    body = b"".join([COUNTS.pack(len(packs), len(rows)), "\n".join(packs).encode(), b"\0", ids,
                     pack_no.tobytes(), *(c.tobytes() for c in cols), btype.tobytes()])
    salt = os.urandom(32)
    header = HEADER.pack(MAGIC, VERSION, salt)
    sealed = Sealer(object_key(index_key, salt)).seal(zstandard.ZstdCompressor(level=level).compress(body),
                                                      AAD + header)
    return header + sealed


def decode_index_file(index_key: bytes, data: bytes, obj: str) -> tuple[list[str], np.ndarray, np.ndarray,
                                                                      np.ndarray, np.ndarray, np.ndarray,
                                                                      np.ndarray]:
    """(packs, ids, pack numbers, offsets, lengths, raw lengths, types) of an index file."""
    if len(data) < HEADER.size:
        raise IntegrityError(obj, f"index file is {len(data)} bytes, shorter than its header (truncated)")
    magic, version, salt = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise IntegrityError(obj, f"not an index file (magic {magic!r})")
    if version != VERSION:
        raise IntegrityError(obj, f"unsupported index version {version}")
    compressed = Sealer(object_key(index_key, salt)).open(memoryview(data)[HEADER.size:], AAD + data[:HEADER.size],
                                                          obj)
    cap = max(MIN_CAP, MAX_RATIO * len(compressed))
    body = decompress_bounded(zstandard.ZstdDecompressor(), compressed, cap, obj, "index file body")
    try:
        npacks, n = COUNTS.unpack_from(body)
        end_names = body.index(b"\0", COUNTS.size)
        pos = end_names + 1
        if pos + ROW_SIZE * n != len(body):  # before any column is sliced: counts must match the real bytes
            raise ValueError(f"{n} entries need {pos + ROW_SIZE * n} bytes, the body has {len(body)}")
        names = body[COUNTS.size:end_names].decode()
        packs = names.split("\n") if npacks else []
        if len(packs) != npacks:
            raise ValueError(f"{len(packs)} pack names for a pack count of {npacks}")
        ids = np.frombuffer(body, np.uint8, 32 * n, pos).reshape(n, 32)
        pos += 32 * n
        cols = []
        for _ in range(4):
            cols.append(np.frombuffer(body, "<u4", n, pos).astype(np.uint32))
            pos += 4 * n
        btype = np.frombuffer(body, np.uint8, n, pos)
        if n and int(cols[0].max()) >= npacks:
            raise ValueError("a pack number beyond the pack list")
    except (ValueError, struct.error, UnicodeDecodeError) as e:
        raise IntegrityError(obj, f"index file body is malformed ({e})") from None
    return packs, ids.copy(), cols[0], cols[1], cols[2], cols[3], btype.copy()
