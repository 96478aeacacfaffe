"""Content-defined chunking: lossless, bounded, deterministic per key, and shift-resistant."""

from __future__ import annotations

import io
import os

from hypothesis import given, settings
from hypothesis import strategies as st

from vaultflow.storage.chunker import Chunker, ChunkerParams

SMALL = ChunkerParams(avg_size=4096, min_size=1024, max_size=16384)


@settings(max_examples=80, deadline=None)
@given(data=st.binary(max_size=100_000) | st.builds(os.urandom, st.integers(0, 200_000)),
       seed=st.integers(1, 2**63 - 1))
def test_chunks_reassemble_the_input_within_size_bounds(data, seed):
    chunks = [bytes(c) for c in Chunker(SMALL, seed).stream(io.BytesIO(data))]
    assert b"".join(chunks) == data
    assert all(len(c) <= SMALL.max_size for c in chunks)
    assert all(len(c) >= SMALL.min_size for c in chunks[:-1])
    assert [bytes(c) for c in Chunker(SMALL, seed).buffer(data)] == chunks  # stream and buffer agree


def test_boundaries_depend_on_the_repository_seed():
    data = os.urandom(1 << 20)
    a = [len(c) for c in Chunker(SMALL, 1234).buffer(data)]
    b = [len(c) for c in Chunker(SMALL, 98765).buffer(data)]
    assert a != b


def test_an_insertion_only_changes_nearby_chunks():
    data = os.urandom(1 << 20)
    before = {bytes(c) for c in Chunker(SMALL, 7).buffer(data)}
    after = {bytes(c) for c in Chunker(SMALL, 7).buffer(data[:500_000] + b"inserted" + data[500_000:])}
    assert len(before & after) >= len(before) - 3


def test_default_parameters_match_the_format_spec():
    p = ChunkerParams()
    assert (p.min_size, p.avg_size, p.max_size) == (256 << 10, 1 << 20, 8 << 20)
