"""Content-defined chunking (FastCDC 2020, compiled), seeded per repository.

Streams a file through a bounded buffer: a file is never loaded whole, and never memory-mapped (a source
file truncated while mapped would kill the process with SIGBUS).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from pyfastcdc import FastCDC


@dataclass(frozen=True)
class ChunkerParams:
    """Chunk size bounds in bytes. FastCDC's mean chunk is about avg_size + min_size (≈ 1.25 MiB)."""

    avg_size: int = 1 << 20
    min_size: int = 256 << 10
    max_size: int = 8 << 20

    def __post_init__(self) -> None:
        if not (64 <= self.min_size <= self.avg_size <= self.max_size):
            raise ValueError(f"chunker sizes must satisfy 64 <= min <= avg <= max, got {self}")
        if self.max_size > 16 << 20 or self.avg_size > 4 << 20 or self.min_size > 1 << 20:
            raise ValueError("chunker sizes too large: max 16 MiB, avg 4 MiB, min 1 MiB")


class Chunker:
    """Cuts byte streams into content-defined chunks; one instance per thread (FastCDC is not thread-safe)."""

    def __init__(self, params: ChunkerParams, seed: int) -> None:
        self.params = params
        self._cdc = FastCDC(params.avg_size, min_size=params.min_size, max_size=params.max_size, seed=seed)
        self._buffer: bytearray | None = None  # reused for small files: allocating per file dominated

    def stream(self, f: BinaryIO) -> Iterator[memoryview]:
        """Chunks of an open binary file; each view is valid only until the next one is produced.

        A file that fits in one max-size chunk is read into a reused buffer and cut there (pyfastcdc's stream
        reader allocates a 2 × max_size buffer per call: 5,000 small files/s instead of 90,000); larger
        files stream through that reader, so memory stays bounded whatever the file size.
        """
        if self._buffer is None:
            self._buffer = bytearray(self.params.max_size + 1)
        view = memoryview(self._buffer)
        filled = 0
        while filled < len(view):
            n = f.readinto(view[filled:])  # type: ignore[attr-defined]
            if not n:
                break
            filled += n
        if filled <= self.params.max_size:  # the whole file is in the buffer
            yield from (chunk.data for chunk in self._cdc.cut_buf(view[:filled]))
            return
        yield from (chunk.data for chunk in self._cdc.cut_stream(_Prefixed(bytes(view[:filled]), f)))

    def buffer(self, data: bytes | memoryview) -> Iterator[memoryview]:
        """Chunks of an in-memory buffer (views into it)."""
        for chunk in self._cdc.cut_buf(data):
            yield chunk.data


class _Prefixed:
    """A reader that yields `head` first, then the rest of `f` (the bytes already read to size the file)."""

    def __init__(self, head: bytes, f: BinaryIO) -> None:
        self._head = memoryview(head)
        self._f = f

    def readinto(self, b: memoryview) -> int:
        if self._head:
            n = min(len(b), len(self._head))
            b[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        return int(self._f.readinto(b))  # type: ignore[attr-defined]
