"""The SQLite source: one database file, copied consistently with SQLite's online backup API and stored as a stream.

The copy is taken in the flow's process into its local scratch, and row counts are taken on that copy, so they are
exactly the rows the snapshot holds. Restore writes a file that passed `PRAGMA integrity_check`, never a half one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import quote, unquote, urlsplit

from vaultflow.storage.errors import SourceError

from .base import Capture, Source, SourceSpec, slug, stream_listing

STEP_PAGES = 4096  # pages per backup step (16 MiB at the default page size)
BUSY_SECONDS = 60.0  # how long a statement waits for a writer's lock before it fails


def _path_of(url: str) -> str:
    """`sqlite:///srv/app/app.db` → `/srv/app/app.db`. Only absolute paths: a relative one would depend on the
    directory a worker happens to run in. SQLAlchemy's four-slash form (`sqlite:////srv/app/app.db`) is the same."""
    parts = urlsplit(url)
    if parts.netloc or parts.query or parts.fragment or not parts.path.strip("/"):
        raise SourceError(f"{url}: name a SQLite file by its absolute path, as sqlite:///srv/app/app.db "
                          "(three slashes; encode ? # % and spaces as %3F %23 %25 %20)")
    return os.path.normpath("/" + unquote(parts.path).lstrip("/"))


def _connect(path: str | Path, mode: str) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are begun explicitly) that waits for writers' locks. `mode`:
    ro, rw (the file must exist) or rwc (created if missing)."""
    uri = f"file:{quote(str(path))}?mode={mode}"
    return sqlite3.connect(uri, uri=True, timeout=BUSY_SECONDS, isolation_level=None)


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _tables(conn: sqlite3.Connection) -> list[str]:
    """User tables: SQLite's own (sqlite_*) and virtual tables (their module may be missing here) left out; a
    virtual table's rows live in its shadow tables, which are counted."""
    return [r[0] for r in conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\' "
        "AND coalesce(sql, '') NOT LIKE 'CREATE VIRTUAL TABLE%' ORDER BY name")]


def _count(conn: sqlite3.Connection, table: str) -> int:
    return int(conn.execute(f"SELECT count(*) FROM {_quoted(table)}").fetchone()[0])


def snapshot_copy(path: str, copy: Path, progress: Callable[[int, int], object] | None = None) -> dict[str, int]:
    """Copy the database at `path` into `copy` as of one moment; returns the copy's tables and their row counts.

    The source connection holds one read transaction across every backup step: each step then reads the same
    snapshot, so the copy is consistent and never restarts. (Without it, the backup API restarts whenever another
    connection commits between steps, and under steady writes it never finishes.) In WAL mode writers go on
    meanwhile; with a rollback journal they wait for the copy (up to their own busy timeout). `progress` is called
    after each step with the pages remaining and the total.
    """
    src = _connect(path, "ro")
    dst = _connect(copy, "rwc")
    try:
        src.execute("BEGIN")
        src.execute("SELECT count(*) FROM sqlite_master").fetchone()  # the read transaction starts at a read
        src.backup(dst, pages=STEP_PAGES, progress=(lambda _, left, total: progress(left, total)) if progress
                   else None)
        src.execute("COMMIT")
        return {t: _count(dst, t) for t in _tables(dst)}
    except sqlite3.Error as e:
        raise SourceError(f"cannot copy the SQLite database {path}: {e}") from None
    finally:
        dst.close()
        src.close()


class CopyReader:
    """Reads the consistent copy capture left on the flow's scratch: only a process on the flow's machine sees it."""

    streams = True

    def __init__(self, copy: str) -> None:
        self.copy = copy

    def open(self, key: bytes) -> contextlib.AbstractContextManager[BinaryIO]:
        if key.decode() != os.path.basename(self.copy):
            raise SourceError(f"the SQLite copy {self.copy} holds one stream, not {key.decode(errors='replace')!r}")
        try:
            return open(self.copy, "rb")
        except OSError as e:
            raise SourceError(f"cannot read the SQLite copy {self.copy}: {e.strerror}; SQLite sources are read on "
                              "the flow's machine: use the threads or processes task runner, not Dask") from None

    def identity(self, key: bytes) -> tuple[int, int, int]:
        return 0, 0, 0

    def tables(self, key: bytes) -> list[dict[str, Any]]:
        return []  # counted at capture, on the copy itself


class SQLite(Source):
    """One SQLite database file, `sqlite:///ABSOLUTE/PATH`, stored as one stream named after the file."""

    kind = "sqlite"
    schemes = ("sqlite",)
    streams = True

    @property
    def path(self) -> str:
        return _path_of(self.paths[0])

    @property
    def stream(self) -> str:
        return os.path.basename(self.path)

    @property
    def url(self) -> str:
        return "sqlite://" + quote(self.path)

    def default_name(self) -> str:
        """sqlite:///srv/app/app.db → sqlite-srv-app-app.db."""
        return slug("sqlite" + self.path.replace("/", "-"))

    def check(self) -> None:
        path = self.path
        if not os.path.isfile(path):
            raise SourceError(f"cannot back up {self.url}: no such file ({path})")
        try:
            with contextlib.closing(_connect(path, "ro")) as conn:
                conn.execute("PRAGMA schema_version").fetchone()
        except sqlite3.Error as e:
            raise SourceError(f"cannot back up {self.url}: {path} is not a readable SQLite database ({e})") from None

    def capture(self, scratch: Path, excludes: list[str]) -> contextlib.AbstractContextManager[Capture]:
        """`excludes` do not apply: a database is copied whole."""
        return self._capture(scratch)

    @contextlib.contextmanager
    def _capture(self, scratch: Path) -> Iterator[Capture]:
        self.check()
        folder = Path(tempfile.mkdtemp(prefix="sqlite-", dir=scratch))
        copy = folder / self.stream  # named as the stream: the reader checks the key against it
        try:
            rows = [{"stream": self.stream, "table": t, "rows": n, "checksum": None}
                    for t, n in snapshot_copy(self.path, copy).items()]
            yield Capture(listing=stream_listing([self.stream]), root=str(copy), tables=rows)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    @classmethod
    def reader(cls, spec: SourceSpec) -> CopyReader:
        return CopyReader(spec.root)

    # -- the restore side ------------------------------------------------------------------------------------
    def load(self, dumps: dict[str, Path], jobs: int) -> list[str]:
        """Write the one restored stream to the file the URL names (missing or empty), atomically: a temporary
        file beside it is checked with `PRAGMA integrity_check`, then renamed into place."""
        if len(dumps) != 1:
            raise SourceError(f"a SQLite file takes one stream, got {len(dumps)} ({', '.join(sorted(dumps))}); "
                              "choose one with --stream NAME")
        [(name, dump)] = dumps.items()
        target = Path(self.path)
        if target.exists() and (not target.is_file() or target.stat().st_size):
            raise SourceError(f"{target} already exists and is not empty; restore into a new path")
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".restoring", dir=target.parent)
        except OSError as e:
            raise SourceError(f"cannot restore into {target}: {e.strerror} ({target.parent})") from None
        try:
            with os.fdopen(fd, "wb") as out, open(dump, "rb") as f:
                shutil.copyfileobj(f, out, 8 << 20)
                out.flush()
                os.fsync(out.fileno())
            tables = self._verified(Path(tmp), name)
            if target.exists():
                os.replace(tmp, target)  # the empty file the user prepared
            else:
                os.link(tmp, target)  # refuses a file that appeared meanwhile
                os.unlink(tmp)
        except FileExistsError:
            raise SourceError(f"{target} appeared while restoring; restore into a new path") from None
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        return [f"{name} → {target} ({tables} tables)"]

    @staticmethod
    def _verified(path: Path, name: str) -> int:
        """The number of tables of the database at `path`, after SQLite found it sound."""
        try:
            with contextlib.closing(_connect(path, "rw")) as conn:
                verdict = [r[0] for r in conn.execute("PRAGMA integrity_check")]
                if verdict != ["ok"]:
                    raise SourceError(f"restored stream {name} is not a sound SQLite database "
                                      f"({verdict[0]}); nothing was written")
                return len(_tables(conn))
        except sqlite3.Error as e:
            raise SourceError(f"restored stream {name} is not a SQLite database ({e}); nothing was written") from None

    def count(self, tables: list[str]) -> dict[str, int]:
        """Exact row counts of those of `tables` that exist; a missing one is left out."""
        try:
            # Not mode=ro: a read-only connection leaves a WAL database's -wal and -shm files behind
            with contextlib.closing(_connect(self.path, "rw")) as conn:
                conn.execute("PRAGMA query_only = 1")
                present = set(_tables(conn))
                return {t: _count(conn, t) for t in tables if t in present}
        except sqlite3.Error as e:
            raise SourceError(f"cannot count rows in {self.url}: {e}") from None

    @contextlib.contextmanager
    def scratch_database(self, label: str) -> Iterator[Source]:
        """A path in a new temporary folder (TMPDIR), not yet a file; the folder is removed on exit."""
        folder = tempfile.mkdtemp(prefix=f"vaultflow-sqlite-{slug(label)}-")
        try:
            yield SQLite([f"sqlite://{quote(os.path.join(folder, self.stream))}"])
        finally:
            shutil.rmtree(folder, ignore_errors=True)
