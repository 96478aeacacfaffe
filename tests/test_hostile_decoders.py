"""Hostile but authentic input: decompression bombs and lying length fields are IntegrityErrors naming the object,
decided quickly and in bounded memory, never a MemoryError."""

from __future__ import annotations

import os
import struct
import time
import tracemalloc
from collections.abc import Callable

import pytest
import zstandard

from vaultflow.storage.crypto import Sealer, object_key
from vaultflow.storage.errors import IntegrityError
from vaultflow.storage.index import AAD, COUNTS, HEADER, MAGIC, VERSION, decode_index_file
from vaultflow.storage.pack import (
    CODEC_ZSTD,
    COUNT,
    END_MAGIC,
    FOOTER,
    HEADER_SIZE,
    TRAILER_AAD,
    BlobType,
    PackEntry,
    PackReader,
    PackWriter,
    blob_aad,
)
from vaultflow.storage.pack import HEADER as PACK_HEADER
from vaultflow.storage.pack import MAGIC as PACK_MAGIC
from vaultflow.storage.pack import VERSION as PACK_VERSION

KEY = os.urandom(32)
LIMIT = 200 << 20  # bytes of Python allocations a refusal may cost


def declared_frame(size: int) -> bytes:
    """A 17-byte zstd frame (RFC 8878) whose header declares `size` bytes of content; one RLE block follows."""
    single_segment_fcs8 = 0b1110_0000
    rle_block = (1 | 1 << 1 | 100 << 3).to_bytes(3, "little") + b"A"  # last block, RLE, 100 bytes
    return struct.pack("<IBQ", 0xFD2FB528, single_segment_fcs8, size) + rle_block


def unsized_frame(total: int) -> bytes:
    """Real zstd of `total` zero bytes, without a content size in its header (streamed, so never in memory)."""
    c = zstandard.ZstdCompressor(level=1, write_content_size=False).compressobj()
    zeros = bytes(1 << 20)
    frame = b"".join(c.compress(zeros) for _ in range(total >> 20)) + c.flush()
    assert zstandard.frame_content_size(frame) == -1
    return frame


def refused_within_bounds(call: Callable[[], object], name: str) -> None:
    tracemalloc.start()
    start = time.monotonic()
    try:
        with pytest.raises(IntegrityError, match=name):
            call()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < LIMIT, f"refusing took {peak} bytes"
    assert time.monotonic() - start < 10


def sealed_blob(frame: bytes) -> tuple[PackReader, bytes, PackEntry]:
    salt = os.urandom(32)
    reader = PackReader(KEY, PACK_HEADER.pack(PACK_MAGIC, PACK_VERSION, salt), "data/ab/bomb")
    bid = os.urandom(32)
    sealed = bytes(Sealer(object_key(KEY, salt)).seal(frame, blob_aad(bid, BlobType.DATA, CODEC_ZSTD),
                                                       prefix=bytes([CODEC_ZSTD])))
    return reader, sealed, PackEntry(bid, BlobType.DATA, HEADER_SIZE, len(sealed), 1 << 20)


@pytest.mark.parametrize("frame", [declared_frame(1 << 40), declared_frame(1 << 30), unsized_frame(1 << 30)],
                         ids=["declares-1TiB", "declares-1GiB", "unsized-1GiB"])
def test_blob_bomb_is_refused_in_bounded_memory(frame):
    reader, sealed, entry = sealed_blob(frame)
    refused_within_bounds(lambda: reader.blob(sealed, entry), "data/ab/bomb")


def index_file(body_frame: bytes) -> bytes:
    header = HEADER.pack(MAGIC, VERSION, os.urandom(32))
    return header + bytes(Sealer(object_key(KEY, header[-32:])).seal(body_frame, AAD + header))


@pytest.mark.parametrize("frame", [declared_frame(1 << 40), unsized_frame(1 << 30)], ids=["declares-1TiB",
                                                                                         "unsized-1GiB"])
def test_index_file_bomb_is_refused_in_bounded_memory(frame):
    data = index_file(frame)
    refused_within_bounds(lambda: decode_index_file(KEY, data, "index/bomb"), "index/bomb")


def test_index_counts_larger_than_the_body_are_refused_before_allocating():
    body = COUNTS.pack(1, 2**32 - 1) + b"data/p\0" + bytes(49)
    data = index_file(zstandard.ZstdCompressor().compress(body))
    refused_within_bounds(lambda: decode_index_file(KEY, data, "index/liar"), "index/liar")


def test_pack_trailer_count_larger_than_the_trailer_is_refused():
    salt = os.urandom(32)
    header = PACK_HEADER.pack(PACK_MAGIC, PACK_VERSION, salt)
    trailer = bytes(Sealer(object_key(KEY, salt)).seal(COUNT.pack(2**32 - 1) + bytes(45 * 16),
                                                        TRAILER_AAD + header))
    pack = header + trailer + FOOTER.pack(len(trailer), END_MAGIC)
    reader = PackReader(KEY, header, "data/ab/liar")
    refused_within_bounds(lambda: reader.trailer(pack, len(pack)), "data/ab/liar")


@pytest.mark.parametrize("count", [1, 13, 16])
def test_pack_trailer_length_does_not_reveal_the_blob_count(count):
    def trailer_length(n: int) -> int:
        w = PackWriter(KEY, KEY)
        for i in range(n):
            w.add(os.urandom(32), BlobType.META, bytes([i]))
        data = w.finish()
        return int(FOOTER.unpack_from(data, len(data) - FOOTER.size)[0])

    assert trailer_length(count) == trailer_length(2)  # all in one 16-slot bucket
