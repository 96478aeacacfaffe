"""The worked example of a source (docs/sources.md): a folder of exports that an HTTP API publishes.

`http-exports+https://api.example.com/exports/` serves `index.json` — `[{"name": "2026-11-01.csv", "size": 123,
"etag": "…", "mtime": 1762000000}, …]` (mtime in seconds, optional) — and each export at `<url><name>`, whose HEAD
answers Content-Length, ETag and Last-Modified (the same moment as the index's mtime). Exports form a tree: one
whose size, mtime and ETag did not change since the last snapshot is not downloaded again.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import stat
import urllib.request
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import quote

import blake3
import pyarrow as pa

from vaultflow.storage.errors import SourceError

from .base import LISTING_SCHEMA, Capture, Source, SourceSpec, held, source_password


def etag_id(etag: str | None) -> int:
    """63 bits of an ETag, stored as the entry's `inode`: a new version with the same size and mtime is still seen."""
    tag = (etag or "").removeprefix("W/").strip('"')
    return int.from_bytes(blake3.blake3(tag.encode()).digest()[:8], "big") >> 1 if tag else 0


def get(url: str, token: str | None, method: str = "GET") -> Any:
    """An HTTP response, a binary stream. The token comes from the environment (base.source_password), never from
    the URL or the SourceSpec: each process that reads looks it up itself."""
    request = urllib.request.Request(url, method=method)
    if token:
        request.add_unredirected_header("Authorization", f"Bearer {token}")  # never sent on to a redirect's host
    return urllib.request.urlopen(request, timeout=60)


class ExportsReader:
    """Opens exports by name, in whatever process runs the batch: it has nothing but the folder's URL."""

    streams = False  # a tree: listed with size and identity, unchanged entries skipped

    def __init__(self, base: str) -> None:
        self.base = base
        self.token = source_password(base)

    def open(self, key: bytes) -> contextlib.AbstractContextManager[BinaryIO]:
        return get(self.base + quote(key.decode()), self.token)  # type: ignore[no-any-return]  # streams as it is read

    def identity(self, key: bytes) -> tuple[int, int, int]:
        """(size, mtime_ns, version) now: asked before and after reading, so a change meanwhile is recorded."""
        with get(self.base + quote(key.decode()), self.token, "HEAD") as r:
            modified = r.headers.get("Last-Modified")
            mtime = int(parsedate_to_datetime(modified).timestamp()) * 10**9 if modified else 0
            return int(r.headers.get("Content-Length") or 0), mtime, etag_id(r.headers.get("ETag"))

    def tables(self, key: bytes) -> list[dict[str, Any]]:
        return []  # row counts: database sources only


class HttpExports(Source):
    """`http-exports+http(s)://HOST/PATH/`: the exports its index.json lists."""

    kind = "http-exports"
    schemes = ("http-exports+http", "http-exports+https")

    @property
    def base(self) -> str:
        return self.url.removeprefix("http-exports+").rstrip("/") + "/"

    def index(self) -> list[dict[str, Any]]:
        try:
            with get(self.base + "index.json", source_password(self.base)) as r:
                return list(json.load(r))
        except (OSError, ValueError) as e:
            raise SourceError(f"cannot read the index of {self.url}: {e}; check the URL and the token") from None

    def check(self) -> None:
        self.index()

    def capture(self, scratch: Path, excludes: list[str]) -> contextlib.AbstractContextManager[Capture]:
        rows, errors = [], []
        for entry in self.index():
            name = str(entry.get("name", ""))
            if not name or "/" in name or name in (".", ".."):
                errors.append((name.encode(), "not a plain file name; not backed up"))
                continue
            if any(fnmatch.fnmatchcase(name, pattern) for pattern in excludes):
                continue
            mtime = int(entry.get("mtime") or 0) * 10**9  # whole seconds, as Last-Modified says it
            rows.append({"key": name.encode(), "path": name, "type": "file", "size": int(entry.get("size") or 0),
                         "mode": stat.S_IFREG | 0o644, "uid": 0, "gid": 0, "mtime_ns": mtime, "ctime_ns": mtime,
                         "inode": etag_id(entry.get("etag")), "dev": 0, "nlink": 1})
        listing = pa.Table.from_pylist(rows, schema=LISTING_SCHEMA).sort_by("key")
        return held(Capture(listing=listing, root=self.base, errors=errors))  # nothing to hold open

    @classmethod
    def reader(cls, spec: SourceSpec) -> ExportsReader:
        return ExportsReader(spec.root)
