"""The Source protocol: what a backup reads, owned by its consumer (the backup flow and the archiver).

A source is named by a URL and implemented in one module of `tasks/sources/`; subclassing `Source` registers it
(tasks.sources finds every module there), so the flow, the CLI and the deployments find it with no `if`.

A source yields **entries** in a listing (Arrow, `LISTING_SCHEMA`):
- files of a tree, listed with metadata and a change identity, read by key (`Reader.open`), unchanged ones
  skipped by change detection;
- or **streams** of unknown length (a database dump, a command's stdout), chunked as they arrive and always
  read (content-defined chunking dedups what did not change). A stream that fails — non-zero exit, signal,
  truncation — fails the snapshot: nothing is committed (`SourceError` out of `Reader.open`'s exit).

Two sides run in different places. `capture()` runs once in the flow's process and is held open until the run
ends: a database source holds its consistent snapshot there (and records per-table row counts inside it).
`reader()` runs wherever a batch runs (a thread, a worker process, a Dask worker): it gets only the picklable
`SourceSpec` (the redacted URL, a root and a token such as an exported snapshot id) and opens entries by key.
Credentials never travel in either: see `source_password()`.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, ClassVar, Protocol
from urllib.parse import unquote, urlsplit, urlunsplit

import pyarrow as pa
from pydantic import BaseModel, ConfigDict

from vaultflow.storage.errors import SourceError
from vaultflow.storage.manifest import DATABASES_SCHEMA

LISTING_SCHEMA = pa.schema([
    ("key", pa.binary()), ("path", pa.string()), ("raw_path", pa.binary()), ("type", pa.string()),
    ("size", pa.int64()), ("mode", pa.uint32()), ("uid", pa.uint32()), ("gid", pa.uint32()),
    ("mtime_ns", pa.int64()), ("ctime_ns", pa.int64()), ("inode", pa.uint64()), ("dev", pa.uint64()),
    ("nlink", pa.uint32()), ("link_target", pa.binary()),
])

# Per-table evidence a database source records inside its consistent snapshot (storage.manifest.DATABASES_SCHEMA):
# a restore test restores the stream and compares. `checksum` is null where the database offers none cheaply.
TABLE_COLUMNS = tuple(DATABASES_SCHEMA.names)  # stream, table, rows, checksum


class SourceSpec(BaseModel):
    """What a batch needs to read a source anywhere: pickles, holds no credential."""

    model_config = ConfigDict(frozen=True)

    kind: str  # the registered Source.kind
    url: str  # as the user named it, credentials removed
    root: str  # what entry keys are relative to (a folder, an fsspec URL, a scratch path, …)
    token: str = ""  # capture's handle for readers (an exported snapshot id, …); never a secret
    streams: bool = False  # entries are streams: always read, a failure fails the snapshot


@dataclass
class Capture:
    """What `Source.capture` found; held by the flow until the snapshot is committed."""

    listing: pa.Table  # LISTING_SCHEMA, sorted by key
    root: str
    errors: list[tuple[bytes, str]] = field(default_factory=list)  # (exact path bytes, why) of unlisted entries
    token: str = ""
    tables: list[dict[str, Any]] = field(default_factory=list)  # rows of TABLE_COLUMNS, taken inside the snapshot


class Reader(Protocol):
    """Opens entries by listing key, in any process. Tree sources also say an entry's identity now, so a change
    while it was read is noticed; stream sources check the producer's exit when the stream is closed."""

    streams: bool

    def open(self, key: bytes) -> contextlib.AbstractContextManager[BinaryIO]: ...

    def identity(self, key: bytes) -> tuple[int, int, int]: ...  # size, mtime_ns, version identity (trees)

    def tables(self, key: bytes) -> list[dict[str, Any]]: ...  # TABLE_COLUMNS rows learnt while streaming


class Source:
    """Subclass per kind of source, in one module of tasks/sources/. Set `kind` and `schemes` (URL schemes it
    accepts; `matches` may be overridden), implement `capture` and `reader`; database sources also implement
    the restore side (`load`, `count`, `scratch_database`)."""

    kind: ClassVar[str] = ""
    schemes: ClassVar[tuple[str, ...]] = ()
    streams: ClassVar[bool] = False
    priority: ClassVar[int] = 0  # when several match a URL, the highest wins (a local path matches last)
    registry: ClassVar[dict[str, type[Source]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.kind:
            Source.registry[cls.kind] = cls

    password_in_url: ClassVar[bool] = False  # a password typed into the URL is the source's own (databases)

    def __init__(self, paths: list[str]) -> None:
        """No I/O here: a source is built in the flow, in the CLI (to refuse typos) and in every worker. A
        password typed into the URL moves into this process's VAULTFLOW_SOURCE_PASSWORD (worker processes
        inherit it): the URL that flow parameters, logs and records carry has none."""
        if self.password_in_url and paths:
            url, password = split_password(paths[0])
            if password is not None:
                os.environ["VAULTFLOW_SOURCE_PASSWORD"] = password
            paths = [url, *paths[1:]]
        self.paths = paths

    @classmethod
    def matches(cls, path: str) -> bool:
        return scheme_of(path) in cls.schemes

    @property
    def url(self) -> str:
        """What records, logs and run parameters show: credentials removed."""
        return redact(self.paths[0])

    @property
    def shown_paths(self) -> list[str]:
        """What the snapshot record keeps as `paths` (restore tests find the source again from them)."""
        return [self.url]

    def default_name(self) -> str:
        """A stable source name: postgresql://db.example/app → db.example-app."""
        parts = urlsplit(self.paths[0])
        return slug(f"{parts.hostname or ''}-{parts.path}" if parts.netloc else self.paths[0])

    def check(self) -> None:
        """Refuse a typo before a flow run exists (a missing path, an unreachable server): raise SourceError."""

    def capture(self, scratch: Path, excludes: list[str]) -> contextlib.AbstractContextManager[Capture]:
        raise NotImplementedError

    def spec(self, capture: Capture) -> SourceSpec:
        return SourceSpec(kind=self.kind, url=self.url, root=capture.root, token=capture.token,
                          streams=self.streams)

    @classmethod
    def reader(cls, spec: SourceSpec) -> Reader | None:
        """None: local files under spec.root, read by the archiver's own descriptor-relative path."""
        raise NotImplementedError

    # -- the restore side of a database source ----------------------------------------------------------------
    def load(self, dumps: dict[str, Path], jobs: int) -> list[str]:
        """Load restored streams (name → file) into the database this source's URL names; returns what it
        loaded, in words. The target must not already hold tables (refuse clearly)."""
        raise SourceError(f"{self.kind} sources cannot be restored into a database; restore the files instead")

    def count(self, tables: list[str]) -> dict[str, int]:
        """Row counts of `tables` (as recorded in TABLE_COLUMNS' `table`) in the database this URL names."""
        raise SourceError(f"{self.kind} sources have no row counts")

    def scratch_database(self, label: str) -> contextlib.AbstractContextManager[Source]:
        """A new, empty database beside this one (same server), dropped on exit: where a restore test loads."""
        raise SourceError(f"{self.kind} sources have no scratch database")


def scheme_of(path: str) -> str:
    return path.split("://", 1)[0].lower() if "://" in path else ""


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")[:128] or "root"


def split_password(url: str) -> tuple[str, str | None]:
    """(the URL without its password, the password): `postgresql://ann:pw@h/db` → (`postgresql://ann@h/db`, pw)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url, None
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{parts.username}@{host}" if parts.username else host
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment)), unquote(parts.password)


def redact(url: str) -> str:
    """The URL as it may be shown: any password removed, the user kept (it says whose rights the dump had)."""
    return split_password(url)[0] if "://" in url else url


def source_password(url: str) -> str | None:
    """The source's password, if one is set outside the tool's own environment variables (PGPASSWORD,
    MYSQL_PWD, which the tools read themselves): VAULTFLOW_SOURCE_PASSWORD, VAULTFLOW_SOURCE_PASSWORD_FILE, or
    the Prefect Secret block named by VAULTFLOW_SOURCE_SECRET. Never from a parameter, never logged."""
    if os.environ.get("VAULTFLOW_SOURCE_PASSWORD"):
        return os.environ["VAULTFLOW_SOURCE_PASSWORD"]
    path = os.environ.get("VAULTFLOW_SOURCE_PASSWORD_FILE")
    if path:
        try:
            return Path(path).read_text().rstrip("\r\n")
        except OSError as e:
            raise SourceError(f"cannot read the source password file {path}: {e.strerror}") from None
    block = os.environ.get("VAULTFLOW_SOURCE_SECRET")
    if block:
        from prefect.blocks.system import Secret

        return str(Secret.load(block).get())  # type: ignore[union-attr]  # sync context: a Secret, not a coroutine
    return None


def stream_listing(names: list[str]) -> pa.Table:
    """A listing of streams: one regular-file row per name, size unknown (0), stamped now."""
    now = time.time_ns()
    rows = [{"key": n.encode(), "path": n, "raw_path": None, "type": "file", "size": 0,
             "mode": stat.S_IFREG | 0o600, "uid": os.getuid(), "gid": os.getgid(), "mtime_ns": now, "ctime_ns": now,
             "inode": 0, "dev": 0, "nlink": 1, "link_target": None} for n in sorted(set(names))]
    if len(rows) != len(names):
        raise SourceError(f"two streams share a name: {sorted(names)}")
    return pa.Table.from_pylist(rows, schema=LISTING_SCHEMA)


@contextlib.contextmanager
def held(capture: Capture) -> Iterator[Capture]:
    """A capture with nothing to hold open (a tree)."""
    yield capture


@contextlib.contextmanager
def command_stream(argv: list[str], what: str, env: dict[str, str] | None = None) -> Iterator[BinaryIO]:
    """The stdout of `argv` as a stream; on exit the command must have ended with status 0.

    Any other ending — a non-zero status, a signal, a tool missing from PATH — raises SourceError naming `what`
    and the last line the command wrote on stderr, and the snapshot fails. If the reader fails first, the
    command is killed. stderr is drained on a thread so a chatty tool cannot block on a full pipe.
    """
    import signal
    import subprocess
    import threading

    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env={**os.environ, **(env or {})}, close_fds=True)
    except FileNotFoundError:
        raise SourceError(f"{what}: {argv[0]} is not installed (not found on PATH)") from None
    except OSError as e:
        raise SourceError(f"{what}: cannot start {argv[0]}: {e.strerror}") from None
    assert proc.stdout is not None and proc.stderr is not None
    tail: list[bytes] = []

    def drain(pipe: Any) -> None:
        for line in pipe:
            if line.strip():
                tail[:] = [*tail[-4:], line.rstrip()]

    t = threading.Thread(target=drain, args=(proc.stderr,), daemon=True)
    t.start()
    try:
        yield proc.stdout  # type: ignore[misc]  # a binary pipe
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        proc.stdout.close()
    rc = proc.wait()
    t.join(5)
    said = tail[-1].decode("utf-8", "replace") if tail else "nothing on stderr"
    if rc < 0:
        name = signal.Signals(-rc).name if -rc in signal.Signals._value2member_map_ else str(-rc)
        raise SourceError(f"{what}: {argv[0]} was killed by {name} ({said}); the stream is incomplete, "
                          "nothing was committed")
    if rc != 0:
        raise SourceError(f"{what}: {argv[0]} exited with status {rc}: {said}; nothing was committed")
