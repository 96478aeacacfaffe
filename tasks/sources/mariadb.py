"""The MariaDB/MySQL source: one `mariadb-dump` stream per database, `<db>.sql`, with per-table row counts.

`mariadb://user@host:3306/shop` (or `mysql://`) backs up `shop`; `mariadb://user@host/?databases=a,b` several.

Consistency. Each database is dumped with `--single-transaction` (one REPEATABLE READ snapshot, no locks), so an
InnoDB database comes back as it was at one instant. MariaDB cannot hand that snapshot to another session (it has
nothing like PostgreSQL's exported snapshots), so the per-table row counts are not queried: they are counted from
the dump's own bytes as they stream past (`_RowCounter`). They are then exactly what the backup holds, which is
what a restore test compares against. What cannot be made consistent: tables of non-transactional engines
(MyISAM, Aria, MEMORY, …) ignore the transaction, so a write during the dump may be half in it; capture warns
naming them. DDL on a table while it is dumped breaks the dump (and so fails the snapshot).

Restore. The dump is taken *without* `--databases`: it holds no `CREATE DATABASE`/`USE`, so `load` restores it
into whatever database the target URL names (a rename, or a scratch database of a restore test); the only other
place the dump names its database, `ALTER DATABASE` around routines, is retargeted while loading.

Credentials. A password typed in the URL is moved out of it into VAULTFLOW_SOURCE_PASSWORD (worker processes
inherit it), so it wins, then whatever else `source_password()` finds, then MYSQL_PWD. It reaches the tools as
MYSQL_PWD, never on their command line, and PyMySQL as an argument; it is never logged nor in a record.
"""

from __future__ import annotations

import contextlib
import getpass
import io
import logging
import os
import re
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO, cast
from urllib.parse import parse_qs, unquote, urlsplit, urlunsplit

from vaultflow.storage.errors import SourceError

from .base import Capture, Source, SourceSpec, command_stream, slug, source_password, stream_listing

_DUMP_FLAGS = ["--single-transaction", "--routines", "--triggers", "--events", "--hex-blob", "--skip-dump-date"]

# Statement heads that start a line of mariadb-dump's output; routine and trigger bodies (between
# `DELIMITER ;;` and `DELIMITER ;`) are skipped, so a CREATE TABLE or INSERT inside them is not counted.
_NAME = rb"`((?:[^`\n]|``)+)`"
_HEAD = re.compile(rb"^(?:INSERT INTO " + _NAME + rb" (?:\((?:`(?:[^`\n]|``)*`|[, ])*\) )?VALUES"
                   rb"|CREATE TABLE " + _NAME + rb" \(|(DELIMITER ;;)\r?$)", re.M)
_BODY_END = re.compile(rb"^DELIMITER ;\r?$", re.M)
# A quoted value: backslash escapes (mysql_real_escape_string), so a string never holds a raw newline
_STRING = re.compile(rb"'[^'\\]*(?:\\.[^'\\]*)*'", re.S)


class _RowCounter:
    """Counts the tuples of each table's INSERT statements in a dump fed in pieces of any size.

    Work is done per block of complete lines (a partial last line waits for the next piece), with regular
    expressions over the block rather than a loop per row. Values are numbers, NULL, 0x… or quoted strings, so
    once strings are removed every `(` left in an INSERT's values opens one tuple, whether mariadb-dump wrote the
    tuples on one line (older versions, MySQL) or one per line (MariaDB 10.11+). A line cannot start inside a
    string, so when every `(` starts a line they are all tuples, and the slower removal of strings is skipped."""

    def __init__(self) -> None:
        self.rows: dict[str, int] = {}
        self.last_line = b""
        self._pending = bytearray()
        self._table: str | None = None  # inside this table's INSERT statement
        self._in_body = False  # between DELIMITER ;; and DELIMITER ;

    def feed(self, data: bytes) -> None:
        nl = data.rfind(b"\n")
        if nl < 0:
            self._pending += data
            return
        block = bytes(self._pending) + data[:nl + 1] if self._pending else data[:nl + 1]
        self._pending = bytearray(data[nl + 1:])
        self._scan(block)

    def close(self) -> None:
        if self._pending:
            self._scan(bytes(self._pending) + b"\n")
            self._pending.clear()

    def _scan(self, block: bytes) -> None:
        tail = block[-65536:].rstrip()  # the last line, if short: only "-- Dump completed" is looked for
        if tail:
            self.last_line = tail[tail.rfind(b"\n") + 1:]
        pos = 0
        while pos < len(block):
            if self._table is not None:  # a statement ends at a line ending in ';' (strings hold no newline)
                end = block.find(b";\n", pos)
                stop = len(block) if end < 0 else end + 1
                n = block.count(b"(", pos, stop)
                if n != block.count(b"\n(", pos, stop) + block.startswith(b"(", pos):  # "(" in a string, or
                    n = _STRING.sub(b"", block[pos:stop]).count(b"(")  # several tuples on one line
                self.rows[self._table] += n
                self._table = None if end >= 0 else self._table
                pos = stop
            elif self._in_body:
                m = _BODY_END.search(block, pos)
                self._in_body = m is None
                pos = len(block) if m is None else m.end()
            else:
                m = _HEAD.search(block, pos)
                if m is None:
                    return
                insert, create, body = m.groups()
                if body:
                    self._in_body = True
                else:
                    table = (insert or create).replace(b"``", b"`").decode("utf-8", "replace")
                    self.rows.setdefault(table, 0)
                    self._table = table if insert else None
                pos = m.end()


class _Counted(io.RawIOBase):
    """The dump's stdout, passed through unchanged, with every byte also fed to a row counter."""

    def __init__(self, f: BinaryIO, counter: _RowCounter) -> None:
        super().__init__()
        self._f, self._counter = f, counter

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        n = int(self._f.readinto(b))  # type: ignore[attr-defined]
        if n:
            self._counter.feed(bytes(memoryview(b)[:n]))
        return n


class _Server:
    """Where a URL points (host, port, user, databases) and how the tools and PyMySQL reach it."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.url = url
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 3306
        self.user = unquote(parts.username or "") or getpass.getuser()  # as the client tools default
        named = [unquote(parts.path.strip("/"))] if parts.path.strip("/") else []
        listed = [d for q in parse_qs(parts.query).get("databases", []) for d in q.split(",") if d]
        self.databases = named + listed
        self.root = urlunsplit((parts.scheme, parts.netloc, "", "", ""))  # the server, no database, no password

    def password(self) -> str | None:
        return source_password(self.url) or os.environ.get("MYSQL_PWD") or None

    def tool_argv(self, *names: str) -> list[str]:
        """The first of `names` on PATH (else the first name: starting it then says it is missing), with the
        connection's options; TCP as PyMySQL uses, so `localhost` means the same server to both."""
        tool = next((n for n in names if shutil.which(n)), names[0])
        return [tool, f"--host={self.host}", f"--port={self.port}", "--protocol=TCP", f"--user={self.user}"]

    def tool_env(self) -> dict[str, str]:
        pw = self.password()
        return {"MYSQL_PWD": pw} if pw else {}

    def connect(self) -> Any:
        import pymysql

        try:
            return pymysql.connect(host=self.host, port=self.port, user=self.user, password=self.password() or "",
                                   connect_timeout=5, autocommit=True, charset="utf8mb4")
        except pymysql.err.MySQLError as e:
            code, said = (e.args[0], e.args[1]) if len(e.args) > 1 else (None, str(e))
            hint = ("check the user and the password (MYSQL_PWD or VAULTFLOW_SOURCE_PASSWORD)" if code == 1045
                    else "check the host and port and that the server is running")
            raise SourceError(f"cannot connect to {self.root}: {_one_line(said)}; {hint}") from None

    @contextlib.contextmanager
    def cursor(self) -> Iterator[Any]:
        """A cursor on one connection; a server error is a one-line SourceError."""
        import pymysql

        conn = self.connect()
        try:
            with conn.cursor() as cur:
                yield cur
        except pymysql.err.MySQLError as e:
            raise SourceError(f"{self.root}: {_one_line(e.args[-1])}") from None
        finally:
            conn.close()

    def query(self, sql: str, args: Any = None) -> list[tuple[Any, ...]]:
        with self.cursor() as cur:
            cur.execute(sql, args)
            return list(cur.fetchall())


def _one_line(said: object) -> str:
    return " ".join(str(said).split())


def _quote(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


class DumpReader:
    """Runs one mariadb-dump per stream key `<db>.sql`, in any process; counts rows while the dump streams."""

    streams = True

    def __init__(self, root: str) -> None:
        self.server = _Server(root)
        self._tables: dict[bytes, list[dict[str, Any]]] = {}

    @contextlib.contextmanager
    def open(self, key: bytes) -> Iterator[BinaryIO]:
        db = key.decode().removesuffix(".sql")
        argv = [*self.server.tool_argv("mariadb-dump", "mysqldump"), *_DUMP_FLAGS, "--", db]
        what = f"dump of database {db} on {self.server.root}"
        counter = _RowCounter()
        with command_stream(argv, what, self.server.tool_env()) as f:
            yield cast(BinaryIO, _Counted(f, counter))
        counter.close()
        if not counter.last_line.startswith(b"-- Dump completed"):
            raise SourceError(f"{what}: the dump ended without its '-- Dump completed' line; it is incomplete, "
                              "nothing was committed")
        self._tables[key] = [{"stream": key.decode(), "table": f"{db}.{t}", "rows": n, "checksum": None}
                             for t, n in sorted(counter.rows.items())]

    def identity(self, key: bytes) -> tuple[int, int, int]:
        return 0, 0, 0

    def tables(self, key: bytes) -> list[dict[str, Any]]:
        return self._tables.get(key, [])


class MariaDB(Source):
    """A MariaDB or MySQL server's databases, one dump stream each (see the module docstring)."""

    kind = "mariadb"
    schemes = ("mariadb", "mysql")
    streams = True
    priority = 10

    password_in_url = True

    def __init__(self, paths: list[str]) -> None:
        super().__init__(paths)
        self.server = _Server(self.paths[0])

    def default_name(self) -> str:
        return slug(f"{self.server.host}-{'-'.join(self.server.databases)}")

    def _databases(self) -> list[str]:
        if not self.server.databases:
            raise SourceError(f"{self.url} names no database: add one (…/shop) or several (…/?databases=a,b)")
        return self.server.databases

    def check(self) -> None:
        dbs = self._databases()
        if not any(shutil.which(t) for t in ("mariadb-dump", "mysqldump")):
            raise SourceError("mariadb-dump (or mysqldump) is not installed (not found on PATH): install the "
                              "MariaDB or MySQL client tools")
        found = {r[0] for r in self.server.query(
            "SELECT SCHEMA_NAME FROM information_schema.SCHEMATA WHERE SCHEMA_NAME IN %s", (dbs,))}
        missing = [d for d in dbs if d not in found]
        if missing:
            raise SourceError(f"database {', '.join(missing)} does not exist on {self.server.root} (or the user "
                              f"{self.server.user} may not see it): check the name")

    @contextlib.contextmanager
    def capture(self, scratch: Path, excludes: list[str]) -> Iterator[Capture]:
        """Nothing to hold: each dump is its own transaction. Warns about tables it cannot keep consistent."""
        self.check()
        loose = self.server.query(
            "SELECT CONCAT(TABLE_SCHEMA, '.', TABLE_NAME, ' (', ENGINE, ')') FROM information_schema.TABLES WHERE "
            "TABLE_SCHEMA IN %s AND TABLE_TYPE = 'BASE TABLE' AND ENGINE <> 'InnoDB' ORDER BY 1",
            (self._databases(),))
        if loose:
            _logger().warning("%s: %d tables use a non-transactional engine and may be dumped mid-write: %s",
                              self.url, len(loose), ", ".join(r[0] for r in loose))
        yield Capture(listing=stream_listing([f"{d}.sql" for d in self._databases()]), root=self.server.root)

    @classmethod
    def reader(cls, spec: SourceSpec) -> DumpReader:
        return DumpReader(spec.root)

    # -- the restore side ------------------------------------------------------------------------------------
    def _target(self) -> str:
        dbs = self.server.databases
        if len(dbs) != 1:
            raise SourceError(f"{self.url} must name exactly one database to restore into (…/target)")
        return dbs[0]

    def load(self, dumps: dict[str, Path], jobs: int) -> list[str]:
        """Feed the one `<db>.sql` dump to the `mariadb` client, into the URL's database (created if missing,
        refused if it holds tables). The client loads one statement at a time: `jobs` has no use here."""
        target = self._target()
        sql = {n: p for n, p in dumps.items() if n.endswith(".sql")}
        if len(sql) != 1:
            raise SourceError(f"{len(sql)} database dumps to load into {target} ({', '.join(sorted(sql))}): "
                              "choose one with --stream NAME")
        (name, path), = sql.items()
        self.server.query(f"CREATE DATABASE IF NOT EXISTS {_quote(target)}")
        held = self.server.query("SELECT COUNT(*) FROM information_schema.TABLES WHERE TABLE_SCHEMA = %s",
                                 (target,))[0][0]
        if held:
            raise SourceError(f"database {target} on {self.server.root} already holds {held} tables: restore into "
                              "a new or empty database")
        argv = [*self.server.tool_argv("mariadb", "mysql"), f"--database={target}"]
        with open(path, "rb") as f:
            rc, said = _feed(argv, self.server.tool_env(), _retargeted(f, name.removesuffix(".sql")))
        if rc != 0:
            raise SourceError(f"loading {name} into {target} failed ({argv[0]} exited with status {rc}): {said}")
        return [f"{name} into database {target} on {self.server.root}"]

    def count(self, tables: list[str]) -> dict[str, int]:
        """Exact row counts; `db.t` of the record is `t` in the URL's database (the one the dump was loaded into).
        A table that is not there is left out: the caller reports it missing."""
        target = self._target()
        existing = {r[0] for r in self.server.query(
            "SELECT TABLE_NAME FROM information_schema.TABLES WHERE TABLE_SCHEMA = %s", (target,))}
        prefix = _common_database(tables, existing)
        counts: dict[str, int] = {}
        with self.server.cursor() as cur:
            for name in tables:
                table = name[len(prefix) + 1:] if prefix is not None else name.partition(".")[2]
                if table in existing:
                    cur.execute(f"SELECT COUNT(*) FROM {_quote(target)}.{_quote(table)}")
                    counts[name] = int(cur.fetchone()[0])
        return counts

    @contextlib.contextmanager
    def scratch_database(self, label: str) -> Iterator[MariaDB]:
        name = f"vf_scratch_{re.sub(r'[^A-Za-z0-9_]', '_', label)[:32]}_{uuid.uuid4().hex[:8]}"
        self.server.query(f"CREATE DATABASE {_quote(name)}")
        try:
            parts = urlsplit(self.paths[0])
            yield MariaDB([urlunsplit((parts.scheme, parts.netloc, "/" + name, "", ""))])
        finally:
            self.server.query(f"DROP DATABASE IF EXISTS {_quote(name)}")


def _feed(argv: list[str], env: dict[str, str], lines: Iterator[bytes]) -> tuple[int, str]:
    """Write `lines` to the command's stdin; (its exit status, the last line it wrote on stderr)."""
    with tempfile.TemporaryFile() as err:
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=err,
                                    env={**os.environ, **env})
        except FileNotFoundError:
            raise SourceError(f"{argv[0]} is not installed (not found on PATH): install the MariaDB client") from None
        assert proc.stdin is not None
        try:
            proc.stdin.writelines(lines)
        except BrokenPipeError:
            pass  # the client stopped at an error: its status and stderr say which
        except BaseException:
            proc.kill()
            raise
        finally:
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.close()
            rc = proc.wait()
        err.seek(0)
        said = [ln for ln in err.read().decode("utf-8", "replace").splitlines() if ln.strip()]
    return rc, said[-1] if said else "nothing on stderr"


def _retargeted(lines: Iterator[bytes], source_db: str) -> Iterator[bytes]:
    """The dump's lines, with its own `ALTER DATABASE `db` …` made nameless. mariadb-dump writes them around
    routines created under another default collation; named, they would change the *original* database during a
    restore test on its server (or fail elsewhere); nameless, they apply to the database being loaded."""
    head, body = b"ALTER DATABASE " + _quote(source_db).encode() + b" ", False
    for line in lines:
        if line.startswith(b"DELIMITER "):
            body = line.rstrip() == b"DELIMITER ;;"
        elif not body and line.startswith(head):
            line = b"ALTER DATABASE " + line[len(head):]
        yield line


def _common_database(names: list[str], existing: set[str]) -> str | None:
    """The source database shared by all recorded names `db.t` whose `t` exists (names and databases may hold
    dots, so splitting at the first dot is only the fallback)."""
    common: set[str] | None = None
    for name in names:
        dbs = {name[:-len(t) - 1] for t in existing if name.endswith("." + t)}
        if dbs:  # else the table is missing: it says nothing about the prefix
            common = dbs if common is None else common & dbs
    return next(iter(common)) if common and len(common) == 1 else None


def _logger() -> Any:
    try:
        from prefect import get_run_logger

        return get_run_logger()
    except Exception:  # outside a flow run (a test, the CLI's check)
        return logging.getLogger(__name__)
