"""Packs: blobs round-trip, and any flipped bit or truncation is detected and names the pack."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vaultflow.storage.crypto import keyed_hash
from vaultflow.storage.errors import IntegrityError
from vaultflow.storage.pack import BlobType, PackWriter, parse_pack

BLOB_KEY, ID_KEY = os.urandom(32), os.urandom(32)


def build(blobs: list[bytes]) -> tuple[bytes, list[bytes]]:
    w = PackWriter(BLOB_KEY, ID_KEY)
    ids = [keyed_hash(ID_KEY, b) for b in blobs]
    for bid, b in zip(ids, blobs, strict=True):
        w.add(bid, BlobType.DATA, b)
    return w.finish(), ids


def read_all(data: bytes, name: str = "data/ab/pack1") -> dict[bytes, bytes]:
    reader, entries = parse_pack(BLOB_KEY, data, name)
    return {e.id: reader.blob(data[e.offset:e.offset + e.length], e) for e in entries}


@settings(max_examples=60, deadline=None)
@given(st.lists(st.binary(max_size=5000) | st.builds(lambda n: b"ab" * n, st.integers(0, 20000)), max_size=8))
def test_blobs_round_trip(blobs):
    data, ids = build(blobs)
    assert read_all(data) == dict(zip(ids, blobs, strict=True))


def test_compressible_blobs_are_compressed_and_random_ones_are_not():
    text, noise = b"all work and no play " * 50000, os.urandom(1 << 20)
    data, _ = build([text, noise])
    _, entries = parse_pack(BLOB_KEY, data, "p")
    assert entries[0].length < len(text) / 20
    assert len(noise) < entries[1].length <= len(noise) + 64


def test_every_flipped_bit_is_detected_and_names_the_pack():
    data, _ = build([b"first blob " * 10, os.urandom(50), b""])
    for i in range(len(data)):
        for bit in range(8):
            bad = bytearray(data)
            bad[i] ^= 1 << bit
            with pytest.raises(IntegrityError, match="data/ab/pack1"):
                read_all(bytes(bad))


def test_every_truncation_is_detected():
    data, _ = build([b"first blob " * 10, os.urandom(50)])
    for n in range(len(data)):
        with pytest.raises(IntegrityError, match="data/ab/pack1"):
            read_all(data[:n])


def test_blob_of_another_id_or_type_does_not_open():
    data, ids = build([b"payload"])
    reader, [entry] = parse_pack(BLOB_KEY, data, "p")
    sealed = data[entry.offset:entry.offset + entry.length]
    from dataclasses import replace
    for forged in (replace(entry, id=os.urandom(32)), replace(entry, type=BlobType.META)):
        with pytest.raises(IntegrityError):
            reader.blob(sealed, forged)


def test_pack_sizes_do_not_reveal_blob_boundaries_in_the_clear():
    blobs = [os.urandom(1000), os.urandom(2000)]
    data, ids = build(blobs)
    for bid in ids:
        assert bid not in data  # ids and lengths live only in the encrypted trailer
