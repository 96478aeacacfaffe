"""The index: lookups, index files round trip and detect damage, and memory stays under 64 bytes/entry."""

from __future__ import annotations

import gc
import os
import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vaultflow.storage.errors import IntegrityError
from vaultflow.storage.index import Index, decode_index_file, encode_index_file
from vaultflow.storage.pack import PackEntry

KEY = os.urandom(32)
entry_st = st.builds(PackEntry, st.binary(min_size=32, max_size=32), st.integers(0, 1),
                     st.integers(40, 2**32 - 1), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1))


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.text("0123456789abcdef", min_size=4, max_size=64).map(lambda s: f"data/{s}"),
                       st.lists(entry_st, max_size=20), max_size=5))
def test_index_file_round_trip(by_pack):
    packs, ids, pack_no, offset, length, raw, btype = decode_index_file(KEY, encode_index_file(KEY, by_pack), "i")
    got: dict[str, list[PackEntry]] = {p: [] for p in packs}
    for i in range(len(ids)):
        got[packs[pack_no[i]]].append(PackEntry(ids[i].tobytes(), int(btype[i]), int(offset[i]), int(length[i]),
                                                int(raw[i])))
    assert got == by_pack


def test_lookup_and_contains_many_agree_across_pending_and_merged_entries():
    idx = Index()
    merged = [PackEntry(os.urandom(32), 0, 40 + i, 100, 200) for i in range(300)]
    by_pack = {"data/p1": merged}
    idx.add_columns(*decode_index_file(KEY, encode_index_file(KEY, by_pack), "i"))
    pending = [PackEntry(os.urandom(32), 1, 40, 7, 9)]
    idx.add("data/p2", pending)
    missing = [os.urandom(32) for _ in range(50)]
    queries = [e.id for e in merged] + [pending[0].id] + missing
    assert idx.contains_many(queries) == [True] * 301 + [False] * 50
    assert idx.lookup(merged[17].id) == ("data/p1", merged[17])
    assert idx.lookup(pending[0].id) == ("data/p2", pending[0])
    assert idx.lookup(missing[0]) is None and missing[0] not in idx
    assert len(idx) == 301 and idx.pack_set() == {"data/p1", "data/p2"}
    assert sorted(e.id for _, e in idx.entries()) == sorted(e.id for e in merged + pending)


def test_ids_sharing_an_8_byte_prefix_are_told_apart():
    idx = Index()
    a, b = b"\x01" * 8 + os.urandom(24), b"\x01" * 8 + os.urandom(24)
    idx.add("data/p", [PackEntry(a, 0, 40, 1, 1), PackEntry(b, 0, 41, 2, 2)])
    idx._merge()
    assert idx.lookup(a)[1].offset == 40 and idx.lookup(b)[1].offset == 41
    assert idx.contains_many([b, a, b"\x01" * 8 + os.urandom(24)]) == [True, True, False]


def test_every_flipped_bit_and_truncation_in_an_index_file_is_detected():
    data = encode_index_file(KEY, {"data/aa": [PackEntry(os.urandom(32), 0, 40, 10, 20)]})
    for i in range(len(data)):
        for bit in range(8):
            bad = bytearray(data)
            bad[i] ^= 1 << bit
            with pytest.raises(IntegrityError, match="index/xyz"):
                decode_index_file(KEY, bytes(bad), "index/xyz")
    for n in range(len(data)):
        with pytest.raises(IntegrityError, match="index/xyz"):
            decode_index_file(KEY, data[:n], "index/xyz")


def test_one_million_entries_fit_in_64_bytes_each(record_property):
    n = 1_000_000
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 256, (n, 32), dtype=np.uint8)
    cols = [rng.integers(0, 2**31, n, dtype=np.uint32) for _ in range(3)]
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    idx = Index()
    idx.add_columns([f"data/{i:064x}" for i in range(64)], ids, (cols[0] % 64).astype(np.uint32), cols[0], cols[1],
                    cols[2], np.zeros(n, np.uint8))
    del ids, cols
    gc.collect()
    held = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    per_entry = held / n
    record_property("index_bytes_per_entry", per_entry)
    print(f"\nindex memory: {per_entry:.1f} bytes per entry at {n:,} entries")
    assert len(idx) == n
    assert per_entry <= 64
