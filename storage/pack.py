"""Pack files: many encrypted blobs plus an encrypted trailer that lists them, so packs describe themselves.

Layout: header (magic, version, salt) | blob* | sealed trailer | trailer length (u32 LE) | end magic. The trailer
is padded before sealing, so its clear length does not reveal the number of blobs.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from enum import IntEnum

import zstandard

from .crypto import OVERHEAD, Sealer, keyed_hash, object_key
from .errors import IntegrityError

MAGIC = b"VFPK"
END_MAGIC = b"VFPT"
VERSION = 1
SALT_SIZE = 32
HEADER = struct.Struct("<4sB3x32s")  # magic, version, salt
HEADER_SIZE = HEADER.size
FOOTER = struct.Struct("<I4s")  # sealed trailer length, end magic
FOOTER_SIZE = FOOTER.size
ENTRY = struct.Struct("<32sBIII")  # id, type, offset, stored length, raw length
COUNT = struct.Struct("<I")  # the real number of entries, first in the sealed trailer
TRAILER_AAD = b"vaultflow pack trailer v1"

CODEC_NONE = 0
CODEC_ZSTD = 1
_SAMPLE = 64 << 10
_STREAM_PIECE = 1 << 20  # output read at a time from a frame that does not declare its size


class BlobType(IntEnum):
    DATA = 0  # a file chunk
    META = 1  # repository metadata stored as a blob (e.g. an encrypted manifest part)


@dataclass(frozen=True, slots=True)
class PackEntry:
    """Where a blob sits in its pack; `length` counts the stored (sealed) bytes."""

    id: bytes
    type: int
    offset: int
    length: int
    raw_length: int


def blob_aad(blob_id: bytes, blob_type: int, codec: int) -> bytes:
    return blob_id + bytes([blob_type, codec])


def trailer_slots(count: int) -> int:
    """Entry slots a trailer of `count` entries is padded to: Padmé (Nikitin et al., PETS 2019) rounded up to a
    multiple of 16, so the clear trailer length leaks O(log log count) bits at under 12 % overhead."""
    n = max(count, 1)
    exponent = n.bit_length() - 1
    mask = (1 << max(exponent - exponent.bit_length(), 0)) - 1
    return -(-((n + mask) & ~mask) // 16) * 16


def decompress_bounded(dctx: zstandard.ZstdDecompressor, payload: bytes | memoryview, cap: int, obj: str,
                       what: str) -> bytes:
    """One zstd frame's content, never allocating more than `cap` bytes (+1): a frame's own size claim is checked
    before anything is allocated, and a frame without one is streamed, so a decompression bomb is an IntegrityError
    naming `obj` rather than a MemoryError."""
    try:
        declared = zstandard.frame_content_size(payload)
        if declared > cap:
            raise IntegrityError(obj, f"{what} declares {declared} bytes of content, more than the {cap} it may hold "
                                      "(a decompression bomb or corruption)")
        if declared >= 0:
            return dctx.decompress(payload)  # allocates `declared`; zstd checks the output matches it
        reader = dctx.stream_reader(payload)
        parts: list[bytes] = []
        total = 0
        while piece := reader.read(min(_STREAM_PIECE, cap + 1 - total)):
            parts.append(piece)
            total += len(piece)
            if total > cap:
                raise IntegrityError(obj, f"{what} expands beyond the {cap} bytes it may hold "
                                          "(a decompression bomb or corruption)")
        return b"".join(parts)
    except zstandard.ZstdError as e:
        raise IntegrityError(obj, f"{what} does not decompress ({e})") from None


def encode_blob(sealer: Sealer, cctx: zstandard.ZstdCompressor, blob_id: bytes, blob_type: int,
                data: bytes | memoryview) -> bytearray:
    """Compress when it pays (a sample decides for large blobs), then seal: codec || nonce || ciphertext || tag,
    with id, type and codec as associated data."""
    codec, payload = CODEC_NONE, data
    if len(data) >= 64:
        sample = data[:_SAMPLE] if len(data) > 4 * _SAMPLE else None
        if sample is None or len(cctx.compress(sample)) < 0.95 * len(sample):
            packed = cctx.compress(data)
            if len(packed) < 0.97 * len(data):
                codec, payload = CODEC_ZSTD, packed
    return sealer.seal(payload, blob_aad(blob_id, blob_type, codec), prefix=bytes([codec]))


def decode_blob(sealer: Sealer, dctx: zstandard.ZstdDecompressor, blob: bytes | bytearray | memoryview,
                entry: PackEntry, obj: str) -> bytes:
    if not len(blob):
        raise IntegrityError(obj, f"blob {entry.id.hex()} is empty")
    codec = blob[0]
    payload = sealer.open(blob, blob_aad(entry.id, entry.type, codec), obj, skip=1)
    if codec == CODEC_NONE:
        data = payload
    elif codec == CODEC_ZSTD:
        data = decompress_bounded(dctx, payload, entry.raw_length, obj, f"blob {entry.id.hex()}")
    else:
        raise IntegrityError(obj, f"blob {entry.id.hex()} has unknown codec {codec}")
    if len(data) != entry.raw_length:
        raise IntegrityError(obj, f"blob {entry.id.hex()} is {len(data)} bytes, index says {entry.raw_length}")
    return data


class PackWriter:
    """Accumulates sealed blobs in memory until the pack is finished; one writer per thread."""

    def __init__(self, blob_key: bytes, chunk_id_key: bytes, level: int = 3) -> None:
        self.salt = os.urandom(SALT_SIZE)
        self._sealer = Sealer(object_key(blob_key, self.salt))
        self._chunk_id_key = chunk_id_key
        self._cctx = zstandard.ZstdCompressor(level=level)
        self._parts: list[bytes | bytearray] = [HEADER.pack(MAGIC, VERSION, self.salt)]
        self.size = HEADER_SIZE
        self.entries: list[PackEntry] = []
        self._data: bytes | None = None

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, blob_id: bytes, blob_type: int, data: bytes | memoryview) -> int:
        """Append one blob; returns the number of bytes it takes in the pack."""
        if self._data is not None:
            raise RuntimeError("pack already finished")
        sealed = encode_blob(self._sealer, self._cctx, blob_id, blob_type, data)
        self.entries.append(PackEntry(blob_id, blob_type, self.size, len(sealed), len(data)))
        self._parts.append(sealed)
        self.size += len(sealed)
        return len(sealed)

    def finish(self) -> bytes:
        """The complete pack, after checking that every blob decrypts back to its id (faulty RAM guard).

        Idempotent, so an upload that failed can be retried with the same bytes; no blob may be added after.
        """
        if self._data is not None:
            return self._data
        self._verify_blobs()
        plain = bytearray(COUNT.size + ENTRY.size * trailer_slots(len(self.entries)))  # zero padding
        COUNT.pack_into(plain, 0, len(self.entries))
        for i, e in enumerate(self.entries):
            ENTRY.pack_into(plain, COUNT.size + i * ENTRY.size, e.id, e.type, e.offset, e.length, e.raw_length)
        trailer = self._sealer.seal(memoryview(plain), TRAILER_AAD + bytes(self._parts[0]))
        self._parts.append(trailer)
        self._parts.append(FOOTER.pack(len(trailer), END_MAGIC))
        self._data = b"".join(self._parts)
        self._parts = []
        return self._data

    def _verify_blobs(self) -> None:
        dctx = zstandard.ZstdDecompressor()
        for entry, sealed in zip(self.entries, self._parts[1:], strict=True):
            data = decode_blob(self._sealer, dctx, sealed, entry, "pack being written")
            if entry.type == BlobType.DATA and keyed_hash(self._chunk_id_key, data) != entry.id:
                raise IntegrityError("pack being written", f"blob {entry.id.hex()} does not match its id after "
                                     "encryption (memory corruption?); nothing was uploaded",
                                     "check this machine's RAM")


class PackReader:
    """Opens blobs of one pack given its header bytes (for the salt) and the blob key."""

    def __init__(self, blob_key: bytes, header: bytes, obj: str) -> None:
        if len(header) < HEADER_SIZE:
            raise IntegrityError(obj, f"pack is {len(header)} bytes, shorter than its {HEADER_SIZE}-byte header")
        magic, version, salt = HEADER.unpack_from(header)
        if magic != MAGIC:
            raise IntegrityError(obj, f"not a pack (magic {magic!r}, expected {MAGIC!r})")
        if version != VERSION:
            raise IntegrityError(obj, f"unsupported pack version {version} (this vaultflow reads {VERSION})")
        self.obj = obj
        self.header = bytes(header[:HEADER_SIZE])
        self._sealer = Sealer(object_key(blob_key, salt))
        self._dctx = zstandard.ZstdDecompressor()

    def blob(self, sealed: bytes | memoryview, entry: PackEntry) -> bytes:
        if len(sealed) != entry.length:
            raise IntegrityError(self.obj, f"blob {entry.id.hex()} truncated: {len(sealed)} of {entry.length} bytes")
        return decode_blob(self._sealer, self._dctx, sealed, entry, self.obj)

    def trailer(self, tail: bytes, pack_size: int) -> list[PackEntry]:
        """Parse the trailer from the last bytes of the pack (`tail` must include the whole sealed trailer)."""
        if pack_size < HEADER_SIZE + FOOTER_SIZE + OVERHEAD or len(tail) < FOOTER_SIZE:
            raise IntegrityError(self.obj, f"pack is {pack_size} bytes, too short to hold a trailer (truncated)")
        length, end_magic = FOOTER.unpack_from(tail, len(tail) - FOOTER_SIZE)
        if end_magic != END_MAGIC:
            raise IntegrityError(self.obj, "pack does not end with its trailer magic (truncated or corrupted)")
        if length > pack_size - HEADER_SIZE - FOOTER_SIZE or length > len(tail) - FOOTER_SIZE:
            raise IntegrityError(self.obj, f"trailer length {length} does not fit the pack (corrupted)")
        sealed = memoryview(tail)[len(tail) - FOOTER_SIZE - length: len(tail) - FOOTER_SIZE]
        plain = self._sealer.open(sealed, TRAILER_AAD + self.header, self.obj)
        count = COUNT.unpack_from(plain)[0] if len(plain) >= COUNT.size else -1
        end_entries = COUNT.size + ENTRY.size * count
        if count < 0 or len(plain) != COUNT.size + ENTRY.size * trailer_slots(count) \
                or plain.count(0, end_entries) != len(plain) - end_entries:
            raise IntegrityError(self.obj, f"trailer of {len(plain)} bytes does not hold {count} entries with their "
                                           "zero padding (corrupted)")
        entries = [PackEntry(*ENTRY.unpack_from(plain, i)) for i in range(COUNT.size, end_entries, ENTRY.size)]
        end = pack_size - FOOTER_SIZE - length
        for e in entries:
            if e.offset < HEADER_SIZE or e.offset + e.length > end:
                raise IntegrityError(self.obj, f"trailer entry {e.id.hex()} points outside the pack")
        return entries

    @staticmethod
    def trailer_span(tail: bytes) -> int:
        """How many bytes from the end of the pack the trailer and footer take (from the footer alone)."""
        length, _ = FOOTER.unpack_from(tail, len(tail) - FOOTER_SIZE)
        return int(length) + FOOTER_SIZE


def parse_pack(blob_key: bytes, data: bytes, obj: str) -> tuple[PackReader, list[PackEntry]]:
    """Reader and entries of a whole pack held in memory."""
    reader = PackReader(blob_key, data[:HEADER_SIZE], obj)
    return reader, reader.trailer(data, len(data))
