"""The PostgreSQL source against the real server on 127.0.0.1:5432: dumps match the rows counted inside their
exported snapshots while writers commit, failures are one clear line and commit nothing, restores are whole."""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql
from test_cli_backup import vaultflow

from vaultflow.storage.errors import SourceError
from vaultflow.tasks import sources
from vaultflow.tasks.sources.postgresql import PostgreSQL

SERVER = "postgresql://postgres@127.0.0.1:5432"
ACCOUNTS, BALANCE = 100, 1000  # the bank's invariant: the balances always sum to ACCOUNTS * BALANCE
REAL_PG_DUMP = shutil.which("pg_dump")


def connect(db: str) -> psycopg.Connection[Any]:
    return psycopg.connect(host="127.0.0.1", port=5432, user="postgres", dbname=db, autocommit=True)


class Databases:
    """uuid-named databases of one test; every name handed out is dropped at the end, created or not."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def name(self) -> str:
        self.names.append(f"vf_pgtest_{uuid.uuid4().hex[:12]}")
        return self.names[-1]

    def create(self, transfers: int = 0) -> str:
        db = self.name()
        with connect("postgres") as c:
            c.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(db)))
        if transfers:
            make_bank(db, transfers)
        return db

    def drop(self, db: str) -> None:
        with connect("postgres") as c:
            c.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(db)))


@pytest.fixture
def databases() -> Iterator[Databases]:
    made = Databases()
    try:
        yield made
    finally:
        for db in made.names:
            made.drop(db)


def make_bank(db: str, transfers: int) -> None:
    """ACCOUNTS accounts and `transfers` past transfers of ~80 bytes each in a dump (250,000 ≈ 20 MB)."""
    with connect(db) as c:
        c.execute("CREATE TABLE accounts (id int PRIMARY KEY, balance bigint NOT NULL)")
        c.execute("INSERT INTO accounts SELECT g, %s FROM generate_series(1, %s::int) g", (BALANCE, ACCOUNTS))
        c.execute("CREATE TABLE transfers (id bigserial PRIMARY KEY, src int, dst int, amount int, note text)")
        c.execute("INSERT INTO transfers (src, dst, amount, note) SELECT 0, 0, 0, md5(g::text) || md5((-g)::text) "
                  "FROM generate_series(1, %s::int) g", (transfers,))


def bank_state(db: str) -> tuple[int, dict[str, int]]:
    """(sum of balances, row counts as the source records them)."""
    with connect(db) as c:
        total = c.execute("SELECT sum(balance) FROM accounts").fetchone()[0]  # type: ignore[index]
        counts = {f'"public"."{t}"': c.execute(f"SELECT count(*) FROM {t}").fetchone()[0]  # type: ignore[index]
                  for t in ("accounts", "transfers")}
    return int(total), counts


class Writers:
    """Threads moving money between accounts, one transaction per transfer (a row in `transfers` too): the sum
    of balances never changes, and every commit changes the row counts."""

    def __init__(self, dbs: list[str], per_db: int = 2) -> None:
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.commits = 0
        self.errors: list[BaseException] = []
        self.threads = [threading.Thread(target=self._run, args=(db,), daemon=True) for db in dbs
                        for _ in range(per_db)]

    def __enter__(self) -> Writers:
        for t in self.threads:
            t.start()
        self.wait_for(5)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)
        assert not self.errors, self.errors

    def _run(self, db: str) -> None:
        rng = random.Random()
        try:
            with connect(db) as conn:
                while not self.stop.is_set():
                    a, b = sorted(rng.sample(range(1, ACCOUNTS + 1), 2))  # in id order: writers never deadlock
                    amount = rng.choice([-1, 1]) * rng.randint(1, 50)
                    with conn.transaction():
                        conn.execute("UPDATE accounts SET balance = balance - %s WHERE id = %s", (amount, a))
                        conn.execute("UPDATE accounts SET balance = balance + %s WHERE id = %s", (amount, b))
                        conn.execute("INSERT INTO transfers (src, dst, amount, note) VALUES (%s, %s, %s, 'move')",
                                     (a, b, amount))
                    with self.lock:
                        self.commits += 1
                    time.sleep(0.002)
        except BaseException as e:  # noqa: BLE001 - reported by __exit__ / wait_for
            self.errors.append(e)

    def wait_for(self, n: int, timeout: float = 60) -> None:
        """Until `n` more transfers have committed."""
        target, deadline = self.commits + n, time.monotonic() + timeout
        while self.commits < target:
            assert not self.errors, self.errors
            assert time.monotonic() < deadline, f"writers committed {self.commits} of {target} transfers"
            time.sleep(0.01)


def fake_pg_dump(folder: Path, body: str) -> Path:
    """A `pg_dump` first in PATH that answers --version like the real one (check() asks) and else runs `body`."""
    folder.mkdir(exist_ok=True)
    script = folder / "pg_dump"
    script.write_text(f'#!/bin/sh\ncase "$1" in --version) exec {REAL_PG_DUMP} --version;; esac\n{body}\n')
    script.chmod(0o755)
    return folder


def read_streams(src: PostgreSQL, cap: Any, folder: Path, during: Writers | None = None) -> dict[str, Path]:
    """Read every stream as a worker would (from a pickled spec), in small pieces while writers commit."""
    reader = sources.reader(pickle.loads(pickle.dumps(src.spec(cap))))
    out: dict[str, Path] = {}
    for key in cap.listing["key"].to_pylist():
        out[key.decode()] = folder / key.decode()
        with reader.open(key) as f, open(out[key.decode()], "wb") as w:
            while piece := f.read(1 << 16):
                w.write(piece)
                if during is not None:
                    time.sleep(0.001)
    return out


# -- unit level: capture and reader ------------------------------------------------------------------------------

def test_two_databases_dump_exactly_the_counted_snapshots_while_writers_commit(databases, tmp_path):
    a, b = databases.create(transfers=50_000), databases.create(transfers=50_000)
    src = sources.for_paths([f"{SERVER}/?databases={a},{b}"])
    assert isinstance(src, PostgreSQL)
    src.check()
    with Writers([a, b]) as writers:
        with src.capture(tmp_path, []) as cap:
            writers.wait_for(40)  # committed after the snapshots were exported, before any pg_dump started
            dumps = read_streams(src, cap, tmp_path, during=writers)
            writers.wait_for(10)
    assert sorted(dumps) == sorted([f"{a}.pgdump", f"{b}.pgdump", "globals.sql"])
    assert "CREATE ROLE postgres" in dumps["globals.sql"].read_text()
    recorded = {(t["stream"], t["table"]): t["rows"] for t in cap.tables}
    assert {t["checksum"] for t in cap.tables} == {None}
    assert set(json.loads(cap.token)["snapshots"]) == {a, b}
    for db in (a, b):
        listed = subprocess.run(["pg_restore", "--list", str(dumps[f"{db}.pgdump"])], capture_output=True, text=True)
        assert listed.returncode == 0 and "TABLE DATA public transfers" in listed.stdout, listed.stderr
        mine = {table: rows for (stream, table), rows in recorded.items() if stream == f"{db}.pgdump"}
        assert set(mine) == {'"public"."accounts"', '"public"."transfers"'}
        live_sum, live = bank_state(db)
        assert live_sum == ACCOUNTS * BALANCE
        assert live['"public"."transfers"'] > mine['"public"."transfers"']  # writers committed after capture
        with src.scratch_database("unit") as scratch:
            assert scratch.load({f"{db}.pgdump": dumps[f"{db}.pgdump"]}, 2) == \
                [f"{db}.pgdump → database {scratch.server.database} (2 tables)"]
            assert scratch.count(list(mine)) == mine  # the dump is the snapshot the counts were taken in
            total, _ = bank_state(str(scratch.server.database))
            assert total == ACCOUNTS * BALANCE
        with connect("postgres") as c:  # dropped on exit
            assert not c.execute("SELECT 1 FROM pg_database WHERE datname = %s",
                                 (scratch.server.database,)).fetchall()


def test_whole_server_url_means_every_connectable_database_but_postgres(databases):
    a = databases.create()
    names, superuser = PostgreSQL([f"{SERVER}/"])._databases()
    assert a in names and "postgres" not in names and "template0" not in names and "template1" not in names
    assert superuser


def test_names_and_urls():
    assert PostgreSQL([f"{SERVER}/app"]).default_name() == "127.0.0.1-app"
    assert PostgreSQL(["postgres://ann@db.example:5433/app"]).default_name() == "db.example-5433-app"
    assert PostgreSQL([f"{SERVER}/?databases=a,b"]).default_name() == "127.0.0.1-a-b"
    assert PostgreSQL([f"{SERVER}/"]).default_name() == "127.0.0.1-all"
    with pytest.raises(SourceError, match="not both"):
        PostgreSQL([f"{SERVER}/app?databases=a"])
    with pytest.raises(SourceError, match="unknown parameter 'sslmode'"):
        PostgreSQL([f"{SERVER}/app?sslmode=require"])


def test_password_in_url_never_travels_and_reaches_pg_dump_by_environment(databases, tmp_path, monkeypatch):
    monkeypatch.setenv("VAULTFLOW_SOURCE_PASSWORD", "")  # undone after the test, whatever the source sets
    db = databases.create(transfers=10)
    src = sources.for_paths([f"postgresql://postgres:s%40cr3t@127.0.0.1:5432/{db}"])
    assert os.environ["VAULTFLOW_SOURCE_PASSWORD"] == "s@cr3t"
    assert "cr3t" not in repr(src.paths) + src.url + json.dumps(src.shown_paths)
    src.check()  # psycopg got password=; trust auth accepts it
    seen = tmp_path / "seen"
    fake = fake_pg_dump(tmp_path / "bin", f'printf "%s\\n" "$PGPASSWORD" > {seen}.env; '
                                          f'printf "%s\\n" "$@" > {seen}.argv; printf PGDMP')
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
    with src.capture(tmp_path, []) as cap:
        assert "cr3t" not in src.spec(cap).model_dump_json()
        with sources.reader(src.spec(cap)).open(f"{db}.pgdump".encode()) as f:
            assert f.read() == b"PGDMP"
    assert Path(f"{seen}.env").read_text() == "s@cr3t\n"
    argv = Path(f"{seen}.argv").read_text()
    assert "cr3t" not in argv and "--snapshot=" in argv and "--no-password" in argv


def test_a_user_that_is_not_superuser_dumps_what_it_may_read(databases, tmp_path):
    """As on a managed server: role passwords are left out of globals.sql, which pg_dumpall could not read."""
    role = f"vf_pgtest_role_{uuid.uuid4().hex[:8]}"
    db = databases.create(transfers=100)
    with connect("postgres") as c:
        c.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
    try:
        with connect(db) as c:
            c.execute(sql.SQL("GRANT SELECT ON ALL TABLES IN SCHEMA public TO {0}; "
                              "GRANT SELECT ON ALL SEQUENCES IN SCHEMA public TO {0}").format(sql.Identifier(role)))
        src = PostgreSQL([f"postgresql://{role}@127.0.0.1:5432/{db}"])
        src.check()
        with src.capture(tmp_path, []) as cap:
            assert json.loads(cap.token)["role_passwords"] is False
            dumps = read_streams(src, cap, tmp_path)
        assert f"CREATE ROLE {role}" in dumps["globals.sql"].read_text()
        assert {t["table"]: t["rows"] for t in cap.tables} == {'"public"."accounts"': ACCOUNTS,
                                                                 '"public"."transfers"': 100}
        with PostgreSQL([SERVER + "/"]).scratch_database("role") as scratch:
            scratch.load({f"{db}.pgdump": dumps[f"{db}.pgdump"]}, 1)
            assert bank_state(str(scratch.server.database)) == (ACCOUNTS * BALANCE, {
                '"public"."accounts"': ACCOUNTS, '"public"."transfers"': 100})
    finally:
        databases.drop(db)
        with connect("postgres") as c:
            c.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


# -- unit level: failures ----------------------------------------------------------------------------------------

def test_missing_database_and_closed_port_are_refused_in_one_line():
    from conftest import free_port

    missing = f"vf_pgtest_missing_{uuid.uuid4().hex[:8]}"
    with pytest.raises(SourceError) as e:
        PostgreSQL([f"{SERVER}/{missing}"]).check()
    assert str(e.value) == (f'cannot connect to {SERVER}/{missing}: database "{missing}" does not exist; check the '
                            "name in the URL, or create it")
    port = free_port()
    with pytest.raises(SourceError) as e:
        PostgreSQL([f"postgresql://postgres@127.0.0.1:{port}/db"]).check()
    assert str(e.value) == (f"cannot connect to postgresql://postgres@127.0.0.1:{port}/db: connection refused; is "
                            "the server running and listening on that port?")
    with pytest.raises(SourceError, match="does not exist"), PostgreSQL([f"{SERVER}/{missing}"]).capture(Path(), []):
        pass


def test_pg_dump_killed_halfway_fails_the_stream(databases, tmp_path, monkeypatch):
    db = databases.create(transfers=10)
    fake = fake_pg_dump(tmp_path / "bin", "head -c 100000 /dev/zero; kill -9 $$")
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
    src = PostgreSQL([f"{SERVER}/{db}"])
    src.check()  # the fake answers --version
    with src.capture(tmp_path, []) as cap, pytest.raises(SourceError, match="killed by SIGKILL") as e, \
            sources.reader(src.spec(cap)).open(f"{db}.pgdump".encode()) as f:
        assert len(f.read()) == 100000
    assert str(e.value).startswith(f"pg_dump of {db}: pg_dump was killed by SIGKILL")


def test_pg_dump_missing_from_path_is_refused(databases, tmp_path, monkeypatch):
    db = databases.create()
    src = PostgreSQL([f"{SERVER}/{db}"])
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(SourceError, match=r"pg_dump is not installed \(not found on PATH\); install the PostgreSQL"):
        src.check()
    with src.capture(tmp_path, []) as cap, pytest.raises(SourceError, match="pg_dump is not installed"), \
            sources.reader(src.spec(cap)).open(f"{db}.pgdump".encode()):
        pass


def test_load_refuses_what_would_mix_data(databases, tmp_path):
    a, b = databases.create(transfers=10), databases.create(transfers=10)
    src = PostgreSQL([f"{SERVER}/?databases={a},{b}"])
    with src.capture(tmp_path, []) as cap:
        dumps = read_streams(src, cap, tmp_path)
    with pytest.raises(SourceError, match="2 database dumps .* choose one with --stream NAME"):
        PostgreSQL([f"{SERVER}/{databases.name()}"]).load(dumps, 1)
    with pytest.raises(SourceError, match=f"database {SERVER}/{a} is not empty; restore into a new database"):
        PostgreSQL([f"{SERVER}/{a}"]).load({f"{b}.pgdump": dumps[f"{b}.pgdump"]}, 1)
    with pytest.raises(SourceError, match=f"databases {', '.join(sorted([a, b]))} already exist"):
        PostgreSQL([f"{SERVER}/"]).load(dumps, 1)
    broken = tmp_path / "broken.pgdump"
    broken.write_bytes(dumps[f"{a}.pgdump"].read_bytes()[:2000])
    target = databases.name()
    with pytest.raises(SourceError, match="pg_restore exited with status 1: pg_restore: error"):
        PostgreSQL([f"{SERVER}/{target}"]).load({"x.pgdump": broken}, 1)
    with connect("postgres") as c:  # the database it created for the restore is gone again
        assert not c.execute("SELECT 1 FROM pg_database WHERE datname = %s", (target,)).fetchall()


def test_globals_are_applied_for_a_whole_server_with_existing_roles_let_through(databases, tmp_path):
    role = f"vf_pgtest_role_{uuid.uuid4().hex[:8]}"
    globals_sql = tmp_path / "globals.sql"
    globals_sql.write_text(f"CREATE ROLE postgres;\nCREATE ROLE {role};\n")
    try:
        done = PostgreSQL([f"{SERVER}/"]).load({"globals.sql": globals_sql}, 1)
        assert done == ['globals.sql → roles and tablespaces (1 statements refused, e.g. role "postgres" already '
                        "exists)"]
        with connect("postgres") as c:
            assert c.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchall()
    finally:
        with connect("postgres") as c:
            c.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


# -- end to end: the CLI, a real Prefect server ------------------------------------------------------------------

@pytest.fixture
def cli_env(tmp_path, prefect_server) -> dict[str, str]:
    env = {"VAULTFLOW_REPOSITORY": str(tmp_path / "repo"), "VAULTFLOW_PASSWORD": "pw",
           "VAULTFLOW_HOME": str(tmp_path / "home"), "PREFECT_API_URL": prefect_server}
    vaultflow(["init"], env)
    return env


def snapshots(env: dict[str, str]) -> list[dict[str, Any]]:
    return list(json.loads(vaultflow(["snapshots", "--json"], env).stdout))


def test_cli_backup_while_writers_commit_and_an_unchanged_database_adds_little(databases, cli_env):
    db = databases.create(transfers=250_000)  # a ~20 MB dump
    url = f"{SERVER}/{db}"
    with Writers([db]) as writers:
        before = writers.commits
        vaultflow(["backup", url], cli_env)
        assert writers.commits > before
    vaultflow(["backup", url], cli_env)  # what the writers did after the first
    vaultflow(["backup", url], cli_env)  # nothing changed since the second
    snaps = snapshots(cli_env)
    assert [(s["source"], s["serial"], s["paths"]) for s in snaps] == [(f"127.0.0.1-{db}", n, [url]) for n in (1, 2, 3)]
    first, third = snaps[0]["stats"], snaps[2]["stats"]
    assert first["bytes_read"] > 18_000_000 and first["files"] == 2
    # pg_dump writes its start time into the header, so the dump's first chunk (~1.25 MiB on average, up to
    # 8 MiB) is new in every backup; every other chunk must be found again, and nothing else added
    from vaultflow.storage.repository import Repository

    repo = Repository.open(cli_env["VAULTFLOW_REPOSITORY"], "pw")
    chunks = []
    for serial in (2, 3):
        files = repo.files_table(repo.find_snapshot(f"127.0.0.1-{db}:{serial}")[1])
        chunks.append(dict(zip(files["path"].to_pylist(), files["chunks"].to_pylist(), strict=True)))
    before, after = chunks
    assert after[f"{db}.pgdump"][1:] == before[f"{db}.pgdump"][1:] and len(after[f"{db}.pgdump"]) > 10
    new = {c for cs in after.values() for c in cs} - {c for cs in before.values() for c in cs}
    assert len(new) <= 2  # the dump's header chunk, and globals.sql (pg_dumpall writes a random \restrict key)
    new_bytes = sum(repo.index.lookup(c)[1].raw_length for c in new)  # type: ignore[index]
    assert 0 < third["bytes_added"] <= new_bytes < 8_500_000 and third["bytes_added"] < 0.45 * first["bytes_added"]
    out = vaultflow(["restore-test"], cli_env).stdout
    assert "1 database dumps loaded into scratch databases: 2 tables" in out


def test_cli_backup_failures_are_one_line_and_commit_nothing(databases, cli_env, tmp_path):
    from conftest import free_port

    db = databases.create(transfers=10)
    fake = fake_pg_dump(tmp_path / "bin", "head -c 100000 /dev/zero; kill -9 $$")
    cases = [([f"postgresql://postgres@127.0.0.1:{free_port()}/db"], {}, "connection refused"),
             ([f"{SERVER}/vf_pgtest_missing_{uuid.uuid4().hex[:8]}"], {}, "does not exist"),
             ([f"{SERVER}/{db}"], {"PATH": f"{fake}:{os.environ['PATH']}"}, "pg_dump was killed by SIGKILL")]
    for paths, extra, why in cases:
        failed = vaultflow(["backup", *paths], {**cli_env, **extra}, check=False)
        lines = failed.stderr.strip().splitlines()
        assert failed.returncode != 0 and len(lines) == 1, failed.stderr
        assert lines[0].startswith("vaultflow: error: ") and why in lines[0], failed.stderr
    assert snapshots(cli_env) == []


def test_cli_restore_to_database_and_restore_test_of_a_two_database_snapshot(databases, cli_env):
    a, b = databases.create(transfers=20_000), databases.create(transfers=20_000)
    with Writers([a, b]):
        vaultflow(["backup", f"{SERVER}/?databases={a},{b}"], cli_env)
    from vaultflow.storage.repository import Repository

    repo = Repository.open(cli_env["VAULTFLOW_REPOSITORY"], "pw")
    recorded: dict[str, dict[str, int]] = {}
    for row in repo.databases_table(repo.find_snapshot("latest")[1]).to_pylist():
        recorded.setdefault(row["stream"].removesuffix(".pgdump"), {})[row["table"]] = row["rows"]
    assert set(recorded) == {a, b}

    one = databases.name()  # one stream into a new database
    out = vaultflow(["restore", "latest", "--to-database", f"{SERVER}/{one}", "--stream", f"{a}.pgdump"], cli_env)
    assert f"{a}.pgdump → database {one} (2 tables)" in out.stdout
    assert bank_state(one) == (ACCOUNTS * BALANCE, recorded[a])
    refused = vaultflow(["restore", "latest", "--to-database", f"{SERVER}/{databases.name()}"], cli_env, check=False)
    assert refused.returncode != 0 and "choose one with --stream NAME" in refused.stderr

    for db in (a, b):  # the whole snapshot back onto the server, each database under its own name
        databases.drop(db)
    vaultflow(["restore", "latest", "--to-database", f"{SERVER}/", "--stream", f"{a}.pgdump", "--stream",
               f"{b}.pgdump"], cli_env)
    assert bank_state(a) == (ACCOUNTS * BALANCE, recorded[a])
    assert bank_state(b) == (ACCOUNTS * BALANCE, recorded[b])

    out = vaultflow(["restore-test"], cli_env).stdout
    assert "2 database dumps loaded into scratch databases: 4 tables" in out
