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

    def stream(self, f: BinaryIO) -> Iterator[memoryview]:
        """Chunks of an open binary file; each view is valid only until the next one is produced."""
        for chunk in self._cdc.cut_stream(f):
            yield chunk.data

    def buffer(self, data: bytes | memoryview) -> Iterator[memoryview]:
        """Chunks of an in-memory buffer (views into it)."""
        for chunk in self._cdc.cut_buf(data):
            yield chunk.data
