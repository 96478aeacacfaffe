"""The PostgreSQL source: databases of one server, each dumped by pg_dump from a snapshot that capture exported
and holds open, so a dump holds exactly the rows capture counted; and its restore side (pg_restore, psql).

URLs; a password in one moves into this process's VAULTFLOW_SOURCE_PASSWORD and never travels:
- `postgresql://user@host:port/app`: one database, stream `app.pgdump`;
- `postgresql://user@host:port/?databases=app,billing`: those databases, a stream each;
- `postgresql://user@host:port/`: every database that accepts connections and is not a template, but `postgres`.
Each snapshot also holds `globals.sql` (pg_dumpall --globals-only: roles, tablespaces; outside any snapshot, as
PostgreSQL has none for them). Other settings (PGSSLMODE, …) come from libpq's PG* variables, read by psycopg and
the tools alike.

Consistency: exported snapshots belong to one database. Capture opens a REPEATABLE READ READ ONLY transaction in
each database and exports its snapshot, all before any counting, then counts rows inside each; every pg_dump reads
its database's snapshot. Each dump is internally consistent and matches its counts exactly; the snapshots of
different databases are milliseconds apart, not one instant (PostgreSQL has no cross-database snapshot), so a
transaction committed in between shows in the later databases only.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import re
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import parse_qs, quote, unquote, urlsplit, urlunsplit

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from vaultflow.storage.errors import SourceError

from .base import Capture, Source, SourceSpec, command_stream, slug, source_password, stream_listing

MAINTENANCE = "postgres"  # where databases are listed, created and dropped
GLOBALS = "globals.sql"
DUMP = ".pgdump"
# User tables: no catalogs (schema names starting pg_ are reserved for the system), no extension members
# (CREATE EXTENSION recreates those with its own rows), no partitioned parents (their partitions are counted).
USER_TABLES = """SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE c.relkind = 'r' AND n.nspname <> 'information_schema' AND n.nspname NOT LIKE 'pg\\_%'
   AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid
                   AND d.deptype = 'e')
 ORDER BY 1, 2"""


@dataclass(frozen=True)
class Server:
    """Where the URL points, without credentials: host, port, user and the databases it names."""

    url: str  # redacted
    host: str
    port: int
    user: str
    database: str | None  # the one database in the path
    databases: tuple[str, ...]  # ?databases=a,b

    @property
    def named(self) -> list[str]:
        return [self.database] if self.database else list(self.databases)

    @classmethod
    def parse(cls, url: str) -> Server:
        parts = urlsplit(url)
        query = parse_qs(parts.query, keep_blank_values=True)
        if set(query) - {"databases"}:
            raise SourceError(f"{url}: unknown parameter {sorted(set(query) - {'databases'})[0]!r}; the only one "
                              "is databases=a,b (other settings come from PGSSLMODE and libpq's other variables)")
        database = unquote(parts.path.lstrip("/")) or None
        listed = tuple(dict.fromkeys(d for v in query.get("databases", []) for d in v.split(",") if d))
        if database and listed:
            raise SourceError(f"{url}: name one database in the path or several in ?databases=, not both")
        for db in (database, *listed):
            if db and "/" in db:
                raise SourceError(f"{url}: database {db!r} has a '/' in its name, which a stream name cannot hold")
        try:
            port = parts.port or int(os.environ.get("PGPORT") or 5432)
        except ValueError:
            raise SourceError(f"{url}: the port is not a number") from None
        return cls(url=url, host=parts.hostname or os.environ.get("PGHOST", ""), port=port,
                   user=unquote(parts.username or "") or os.environ.get("PGUSER") or getpass.getuser(),
                   database=database, databases=listed)

    def url_of(self, db: str) -> str:
        parts = urlsplit(self.url)
        return urlunsplit((parts.scheme, parts.netloc, "/" + quote(db), "", ""))

    def connect(self, db: str, **kwargs: Any) -> psycopg.Connection[Any]:
        """A connection, or SourceError with one line saying why not and what to do."""
        if password := source_password(self.url):
            kwargs["password"] = password
        try:
            return psycopg.connect(host=self.host or None, port=self.port, user=self.user, dbname=db,
                                   connect_timeout=5, **kwargs)
        except psycopg.OperationalError as e:
            raise SourceError(f"cannot connect to {self.url_of(db)}: {_why(e)}") from None

    def tool(self, name: str, *args: str, db: str | None = None) -> list[str]:
        """argv of a PostgreSQL client tool; the database as a conninfo, so a name with '=' stays a name."""
        where = ["-h", self.host] if self.host else []
        return [name, "--no-password", *where, "-p", str(self.port), "-U", self.user, *args,
                *(["-d", make_conninfo(dbname=db)] if db else [])]

    def env(self) -> dict[str, str] | None:
        return {"PGPASSWORD": pw} if (pw := source_password(self.url)) else None


def _why(e: psycopg.Error) -> str:
    """libpq's reason in one line, with the next step where it is known."""
    first = (str(e).strip().splitlines() or ["unknown error"])[0]
    core = first.rsplit(" failed: ", 1)[-1].replace("FATAL:  ", "").strip()
    if "Connection refused" in core:
        return "connection refused; is the server running and listening on that port?"
    if "timeout expired" in core:
        return "no answer within 5 s; check the host, the port and any firewall"
    if core.startswith(("database ", "role ")) and "does not exist" in core:
        return f"{core}; check the name in the URL, or create it"
    if "password" in core:
        return f"{core}; set PGPASSWORD, VAULTFLOW_SOURCE_PASSWORD or VAULTFLOW_SOURCE_PASSWORD_FILE"
    return core


@contextlib.contextmanager
def _as_source_error(what: str) -> Iterator[None]:
    """A database error (a missing privilege, a name taken meanwhile) as one line naming what was being done."""
    try:
        yield
    except psycopg.Error as e:
        raise SourceError(f"{what}: {_why(e)}") from None


def _one(conn: psycopg.Connection[Any], query: str | sql.Composed) -> Any:
    row = conn.execute(query).fetchone()
    assert row is not None
    return row[0]


def _user_tables(conn: psycopg.Connection[Any]) -> dict[str, sql.Identifier]:
    """The user tables, keyed as recorded: `"schema"."table"`."""
    tables = {}
    for schema, name in conn.execute(USER_TABLES).fetchall():
        ident = sql.Identifier(schema, name)
        tables[ident.as_string(conn)] = ident
    return tables


def _count(conn: psycopg.Connection[Any], ident: sql.Identifier) -> int:
    return int(_one(conn, sql.SQL("SELECT count(*) FROM {}").format(ident)))


def _run_tool(argv: list[str], what: str, env: dict[str, str] | None) -> str:
    """Run a client tool to its end; its stderr, or SourceError with the line that says what went wrong."""
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, env={**os.environ, **(env or {})})
    except FileNotFoundError:
        raise SourceError(f"{what}: {argv[0]} is not installed (not found on PATH)") from None
    said = done.stderr.decode("utf-8", "replace")
    if done.returncode != 0:
        lines = [line.strip() for line in said.splitlines() if line.strip()]
        errors = [line for line in lines if "error" in line.lower()]  # not the "Command was: …" after it
        raise SourceError(f"{what}: {argv[0]} exited with status {done.returncode}: "
                          f"{(errors or lines or ['nothing on stderr'])[-1]}")
    return said


class DumpReader:
    """Streams pg_dump's output for `<db>.pgdump` (from the snapshot capture holds) and pg_dumpall's globals,
    straight from the tools' stdout: no temporary file. Row counts were taken at capture, so `tables` is empty."""

    streams = True

    def __init__(self, spec: SourceSpec) -> None:
        self.server = Server.parse(spec.url)
        token = json.loads(spec.token or "{}")
        self.snapshots: dict[str, str] = token.get("snapshots", {})
        self.role_passwords: bool = token.get("role_passwords", True)

    def open(self, key: bytes) -> contextlib.AbstractContextManager[BinaryIO]:
        name = key.decode()
        if name == GLOBALS:  # reading role passwords needs a superuser; without them the rest still dumps
            extra = () if self.role_passwords else ("--no-role-passwords",)
            return command_stream(self.server.tool("pg_dumpall", "--globals-only", *extra),
                                  what="pg_dumpall --globals-only", env=self.server.env())
        db = name.removesuffix(DUMP)
        if not name.endswith(DUMP) or db not in self.snapshots:
            raise SourceError(f"{self.server.url} has no stream {name!r} in this capture")
        # --compress=0: the repository compresses chunks itself, and pg_dump's compression would change all of a
        # table's bytes after its first changed row, so content-defined chunking could not find what is unchanged
        argv = self.server.tool("pg_dump", "--format=custom", "--compress=0", f"--snapshot={self.snapshots[db]}",
                                db=db)
        return command_stream(argv, what=f"pg_dump of {db}", env=self.server.env())

    def identity(self, key: bytes) -> tuple[int, int, int]:
        return 0, 0, 0  # streams have no identity to compare

    def tables(self, key: bytes) -> list[dict[str, Any]]:
        return []


class PostgreSQL(Source):
    """One database, several, or all of one PostgreSQL server (see the module docstring for the URLs)."""

    kind = "postgresql"
    schemes = ("postgresql", "postgres")
    streams = True
    priority = 10

    password_in_url = True

    def __init__(self, paths: list[str]) -> None:
        super().__init__(paths)
        self.server = Server.parse(self.paths[0])

    def default_name(self) -> str:
        """127.0.0.1-app; the port when not 5432 (127.0.0.1-5433-app); listed databases joined; `all`."""
        s = self.server
        port = f"-{s.port}" if s.port != 5432 else ""
        return slug(f"{s.host or 'local'}{port}-{s.database or ','.join(s.databases) or 'all'}")

    def check(self) -> None:
        """The client tools are there and new enough, and every named database (or the server) answers."""
        for tool in ("pg_dump", "pg_dumpall"):
            if shutil.which(tool) is None:
                raise SourceError(f"cannot back up {self.url}: {tool} is not installed (not found on PATH); install "
                                  "the PostgreSQL client tools (Debian: apt install postgresql-client)")
        for db in self.server.named or [MAINTENANCE]:
            with self.server.connect(db) as conn:
                server_major = conn.info.server_version // 10000
        out = subprocess.run(["pg_dump", "--version"], capture_output=True, text=True, stdin=subprocess.DEVNULL)
        found = re.search(r"(\d+)", out.stdout)
        if found and int(found.group(1)) < server_major:
            raise SourceError(f"cannot back up {self.url}: pg_dump {found.group(1)} cannot dump a PostgreSQL "
                              f"{server_major} server; install client tools of version {server_major} or newer")

    def _databases(self) -> tuple[list[str], bool]:
        """The databases to dump, and whether this user may read role passwords (a superuser)."""
        named = self.server.named
        with _as_source_error(f"cannot list the databases of {self.url}"), \
                self.server.connect(named[0] if named else MAINTENANCE) as conn:
            superuser = bool(_one(conn, "SELECT rolsuper FROM pg_roles WHERE rolname = current_user"))
            if named:
                return named, superuser
            rows = conn.execute("SELECT datname FROM pg_database WHERE datallowconn AND NOT datistemplate "
                                "AND datname <> %s ORDER BY datname", (MAINTENANCE,)).fetchall()
        odd = [r[0] for r in rows if "/" in r[0]]
        if odd:
            raise SourceError(f"{self.url}: database {odd[0]!r} has a '/' in its name, which a stream name cannot "
                              "hold; list the others with ?databases=")
        return [r[0] for r in rows], superuser

    @contextlib.contextmanager
    def capture(self, scratch: Path, excludes: list[str]) -> Iterator[Capture]:
        """Export one snapshot per database and count every user table inside it; hold them all until the run
        ends. Counts are exact (`count(*)`, a scan of each table). `checksum` stays null: a content checksum
        would read every row a second time, and text forms (floats, collations) differ between server
        versions, so a restore into another version could fail it falsely."""
        with contextlib.ExitStack() as held:
            dbs, superuser = self._databases()
            snapshots: dict[str, str] = {}
            tables: list[dict[str, Any]] = []
            conns = {db: held.enter_context(self.server.connect(db, autocommit=True)) for db in dbs}
            for db, conn in conns.items():  # all snapshots first, so they are milliseconds apart
                with _as_source_error(f"cannot capture {self.server.url_of(db)}"):
                    # held for the whole run: a server-side idle timeout must not end the snapshot under pg_dump
                    conn.execute("SET idle_in_transaction_session_timeout = 0; SET statement_timeout = 0")
                    conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                    snapshots[db] = str(_one(conn, "SELECT pg_export_snapshot()"))
            for db, conn in conns.items():
                with _as_source_error(f"cannot count rows in {self.server.url_of(db)}"):
                    tables += [{"stream": db + DUMP, "table": name, "rows": _count(conn, ident), "checksum": None}
                               for name, ident in _user_tables(conn).items()]
            token = json.dumps({"snapshots": snapshots, "role_passwords": superuser}, sort_keys=True)
            yield Capture(listing=stream_listing([db + DUMP for db in dbs] + [GLOBALS]), root=self.url,
                          token=token, tables=tables)

    @classmethod
    def reader(cls, spec: SourceSpec) -> DumpReader:
        return DumpReader(spec)

    # -- the restore side ------------------------------------------------------------------------------------
    def load(self, dumps: dict[str, Path], jobs: int) -> list[str]:
        """URL with a database: the one `<db>.pgdump` given goes into it (created if missing, refused if it holds
        tables). URL without one (a whole server): each `<db>.pgdump` into a new database `<db>` (refused if any
        exists), after `globals.sql` (roles, tablespaces; errors let through, as `postgres` exists already). A
        single database never gets globals.sql: roles are server-wide. Objects belong to the restoring user
        (--no-owner). A database this call created is dropped again if its restore fails."""
        s = self.server
        pgdumps = {n: p for n, p in dumps.items() if n.endswith(DUMP)}
        if s.database and len(pgdumps) != 1:
            raise SourceError(f"{len(pgdumps)} database dumps ({', '.join(sorted(pgdumps)) or 'none'}) for the one "
                              f"database {self.url}; choose one with --stream NAME")
        plan = {s.database: next(iter(pgdumps.items()))} if s.database else \
            {n.removesuffix(DUMP): (n, p) for n, p in pgdumps.items()}
        with _as_source_error(f"cannot restore into {self.url}"), s.connect(MAINTENANCE, autocommit=True) as conn:
            taken = {r[0] for r in conn.execute("SELECT datname FROM pg_database WHERE datname = ANY(%s)",
                                                (list(plan),))}
            if taken and not s.database:
                raise SourceError(f"databases {', '.join(sorted(taken))} already exist on {self.url}; drop them, or "
                                  "restore each stream with a URL that names a new database")
            if taken:
                with s.connect(next(iter(taken))) as target:
                    if _user_tables(target):
                        raise SourceError(f"database {self.url} is not empty; restore into a new database")
            for db in sorted(set(plan) - taken):
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(db)))
        try:
            done = [self._globals(dumps[GLOBALS])] if not s.database and GLOBALS in dumps else []
            for db, (name, path) in sorted(plan.items()):
                _run_tool(s.tool("pg_restore", f"--jobs={max(1, jobs)}", "--no-owner", "--exit-on-error", str(path),
                                 db=db), f"restore of {name} into {s.url_of(db)}", s.env())
                with _as_source_error(f"cannot count tables in {s.url_of(db)}"), s.connect(db) as conn:
                    done.append(f"{name} → database {db} ({len(_user_tables(conn))} tables)")
        except SourceError:
            self._drop(*sorted(set(plan) - taken))
            raise
        return done

    def _drop(self, *names: str) -> None:
        with _as_source_error(f"cannot drop a database on {self.url}"), \
                self.server.connect(MAINTENANCE, autocommit=True) as conn:
            for name in names:
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    def _globals(self, path: Path) -> str:
        said = _run_tool(self.server.tool("psql", "-X", "-q", "-v", "ON_ERROR_STOP=0", "-f", str(path),
                                          db=MAINTENANCE), f"{GLOBALS} into {self.url}", self.server.env())
        refused = [line for line in said.splitlines() if "ERROR:" in line]
        first = f", e.g. {refused[0].split('ERROR:', 1)[1].strip()}" if refused else ""
        return f"{GLOBALS} → roles and tablespaces ({len(refused)} statements refused{first})"

    def count(self, tables: list[str]) -> dict[str, int]:
        """Exact row counts of those of `tables` (`"schema"."table"`) that exist; a missing one is left out."""
        if not self.server.database:
            raise SourceError(f"{self.url} names no database to count rows in")
        with _as_source_error(f"cannot count rows in {self.url}"), self.server.connect(self.server.database) as conn:
            present = _user_tables(conn)
            return {name: _count(conn, present[name]) for name in tables if name in present}

    @contextlib.contextmanager
    def scratch_database(self, label: str) -> Iterator[Source]:
        """A new database `vf_scratch_<label>_<8 hex>` on this server, dropped on exit even if still in use."""
        name = f"vf_scratch_{re.sub(r'[^a-z0-9_]+', '_', label.lower())[:32]}_{uuid.uuid4().hex[:8]}"
        with _as_source_error(f"cannot create a scratch database on {self.url}"), \
                self.server.connect(MAINTENANCE, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        try:
            yield PostgreSQL([self.server.url_of(name)])
        finally:
            self._drop(name)
