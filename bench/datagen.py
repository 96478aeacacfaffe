"""Deterministic reference data sets, generated from a seed and cached on disk by a hash of their parameters.

Owns the data-set shapes (full and quick), the text/random/CSV generators and the cache layout:
`<data>/<key>/{ref,scale}/` plus `<data>/<key>/COMPLETE` written last (a half-generated set is regenerated).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

# Bump when the generators change in a way that changes bytes on disk, so old caches are not reused.
GENERATOR_VERSION = 1
KiB = 1024
MiB = 1024 * KiB


@dataclass(frozen=True)
class DataSpec:
    """Shape of a reference data set; every field goes into the cache key."""

    text_files: int
    text_min: int
    text_max: int
    random_files: int
    random_size: int
    csv_size: int
    scale_files: int
    scale_min: int
    scale_max: int
    seed: int = 20240611

    def key(self) -> str:
        payload = json.dumps({"v": GENERATOR_VERSION, **asdict(self)}, sort_keys=True).encode()
        return hashlib.sha256(payload).hexdigest()[:12]


FULL = DataSpec(
    text_files=20_000, text_min=1 * KiB, text_max=64 * KiB,
    random_files=8, random_size=64 * MiB, csv_size=256 * MiB,
    scale_files=200_000, scale_min=64, scale_max=2 * KiB,
)
QUICK = DataSpec(
    text_files=300, text_min=1 * KiB, text_max=64 * KiB,
    random_files=2, random_size=4 * MiB, csv_size=8 * MiB,
    scale_files=2_000, scale_min=64, scale_max=2 * KiB,
)


@dataclass(frozen=True)
class TreeStats:
    """Regular-file count and total bytes of a directory tree."""

    files: int
    bytes: int


@dataclass(frozen=True)
class DataSet:
    """A generated, cached data set: `ref` is backed up by measures 1-5, `scale` by measure 6."""

    root: Path
    spec: DataSpec

    @property
    def ref(self) -> Path:
        return self.root / "ref"

    @property
    def scale(self) -> Path:
        return self.root / "scale"

    @property
    def journal(self) -> Path:
        """Where bench.mutate records in-place appends so they can be undone after a crash."""
        return self.root / "append-journal.json"


class TextGen:
    """Seeded pseudo-text: words from a seeded vocabulary, some followed by a newline."""

    def __init__(self, rng: np.random.Generator, vocabulary: int = 4096) -> None:
        self._rng = rng
        lengths = rng.integers(2, 11, size=vocabulary)
        letters = rng.integers(ord("a"), ord("z") + 1, size=int(lengths.sum()), dtype=np.uint8).tobytes()
        words: list[bytes] = []
        pos = 0
        for i, n in enumerate(lengths.tolist()):
            words.append(letters[pos:pos + n] + (b"\n" if i % 13 == 0 else b" "))
            pos += n
        self._words = np.array(words, dtype=object)
        self.words: list[str] = [w.decode().strip() for w in words]

    def text(self, size: int) -> bytes:
        """Exactly `size` bytes of text."""
        out = b""
        while len(out) < size:
            idx = self._rng.integers(0, len(self._words), size=size // 5 + 16)
            out += b"".join(self._words[idx].tolist())
        return out[:size]


def nested(index: int, per_leaf: int, fanout: int) -> Path:
    """Two-level directory for file number `index`: `per_leaf` files per leaf, `fanout` leaves per parent."""
    leaf = index // per_leaf
    return Path(f"d{leaf // fanout:03d}") / f"s{leaf % fanout:02d}"


def write_text_tree(root: Path, gen: TextGen, rng: np.random.Generator, count: int,
                    lo: int, hi: int, per_leaf: int = 50, fanout: int = 20, start: int = 0) -> None:
    """`count` text files of lo..hi bytes under `root` in nested directories."""
    sizes = rng.integers(lo, hi + 1, size=count)
    for i, size in enumerate(sizes.tolist(), start=start):
        d = root / nested(i, per_leaf, fanout)
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i:06d}.txt").write_bytes(gen.text(size))


def _write_random(path: Path, rng: np.random.Generator, size: int) -> None:
    with path.open("wb") as f:
        left = size
        while left:
            n = min(left, 8 * MiB)
            f.write(rng.bytes(n))
            left -= n


def _write_csv(path: Path, rng: np.random.Generator, words: list[str], target: int) -> None:
    """A transactions-like CSV of about `target` bytes, written in Arrow batches (fast, deterministic)."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    vocab = pa.array(words)
    categories = pa.array(["groceries", "rent", "travel", "salary", "fees", "utilities", "misc"])
    batch_rows = 50_000  # ~2.7 MB per batch: overshoots the target by at most that
    row = 0
    with path.open("wb") as f:
        writer: pacsv.CSVWriter | None = None
        while f.tell() < target:
            ts = np.datetime64("2020-01-01T00:00:00", "s") + np.sort(rng.integers(0, 4 * 365 * 86400, batch_rows))
            table = pa.table({
                "id": pa.array(np.arange(row, row + batch_rows, dtype=np.int64)),
                "ts": pa.array(ts),
                "account": pa.array(rng.integers(10_000, 99_999, batch_rows)),
                "amount": pa.array(np.round(rng.normal(0, 250, batch_rows), 2)),
                "category": categories.take(pa.array(rng.integers(0, len(categories), batch_rows))),
                "memo": vocab.take(pa.array(rng.integers(0, len(vocab), batch_rows))),
            })
            if writer is None:
                writer = pacsv.CSVWriter(f, table.schema)
            writer.write_table(table)
            row += batch_rows
            f.flush()
        if writer is not None:
            writer.close()


def _generate(ds: DataSet) -> None:
    spec = ds.spec
    rng = np.random.default_rng(spec.seed)
    gen = TextGen(rng)
    write_text_tree(ds.ref / "text", gen, rng, spec.text_files, spec.text_min, spec.text_max)
    (ds.ref / "random").mkdir(parents=True)
    for i in range(spec.random_files):
        _write_random(ds.ref / "random" / f"blob{i:02d}.bin", rng, spec.random_size)
    (ds.ref / "tables").mkdir(parents=True)
    _write_csv(ds.ref / "tables" / "transactions.csv", rng, gen.words, spec.csv_size)
    write_text_tree(ds.scale, gen, rng, spec.scale_files, spec.scale_min, spec.scale_max, per_leaf=100)


def tree_stats(root: Path) -> TreeStats:
    files = total = 0
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            st = os.lstat(os.path.join(dirpath, name))
            if stat.S_ISREG(st.st_mode):
                files += 1
                total += st.st_size
    return TreeStats(files, total)


def ensure(data_dir: Path, spec: DataSpec) -> tuple[DataSet, bool]:
    """The cached data set for `spec`, generating it first if absent; returns (data set, was generated)."""
    ds = DataSet(data_dir / spec.key(), spec)
    marker = ds.root / "COMPLETE"
    if marker.exists():
        return ds, False
    if ds.root.exists():
        shutil.rmtree(ds.root)
    ds.root.mkdir(parents=True)
    _generate(ds)
    ref, scale = tree_stats(ds.ref), tree_stats(ds.scale)
    (ds.root / "spec.json").write_text(json.dumps(
        {"generator_version": GENERATOR_VERSION, "spec": asdict(spec),
         "ref": asdict(ref), "scale": asdict(scale)}, indent=2))
    marker.write_text("ok\n")
    return ds, True


def warm(root: Path) -> None:
    """Read every file once so each tool starts from the same (warm) page cache."""
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            with open(os.path.join(dirpath, name), "rb") as f:
                while f.read(8 * MiB):
                    pass
