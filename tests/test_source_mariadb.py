"""The MariaDB source against the real server on 127.0.0.1:3306: a dump taken while transfers run restores with
the bank's invariant exact and with the row counts the stream recorded; failures are one-line errors that commit
nothing; backups, restores and restore tests through the CLI and a real Prefect server."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import random
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pymysql
import pytest
from conftest import free_port
from test_cli_backup import vaultflow

from vaultflow.storage.errors import SourceError
from vaultflow.storage.repository import Repository
from vaultflow.tasks.sources import for_paths
from vaultflow.tasks.sources.mariadb import MariaDB, _RowCounter

SERVER = "mariadb://root@127.0.0.1:3306"
REAL_DUMP = shutil.which("mariadb-dump") or "/usr/bin/mariadb-dump"
ACCOUNTS, START = 40, 1000
SEED_TRANSFERS = 30_000
ODD = [  # what the row counter must see through: quotes, commas, parentheses, backslashes, newlines, binary
    (1, "it's a (tricky), string", b"\x00\x01'\"),(\n;"),
    (2, "back\\slash \\' and \\\\", bytes(range(256))),
    (3, "new\nline\r\nand tab\t and ');\n(", b""),
    (4, "),(", b"\n"),
    (5, "", None),
    (6, None, b"'"),
    (7, "naïve ☃ ünïcode", os.urandom(3000)),
    (8, "INSERT INTO `odd` VALUES (1),(2);\nCREATE TABLE `x` (", b"DELIMITER ;;\n"),
]


def connect(db: str | None = None, autocommit: bool = True) -> Any:
    return pymysql.connect(host="127.0.0.1", port=3306, user="root", password="", database=db, charset="utf8mb4",
                           autocommit=autocommit)


def sql(statements: list[str], db: str | None = None) -> list[tuple[Any, ...]]:
    """Run the statements; the rows of the last one."""
    conn = connect(db)
    try:
        with conn.cursor() as cur:
            for s in statements:
                cur.execute(s)
            return list(cur.fetchall())
    finally:
        conn.close()


def databases() -> set[str]:
    return {r[0] for r in sql(["SHOW DATABASES"])}


@pytest.fixture(autouse=True)
def _no_source_password(monkeypatch: pytest.MonkeyPatch) -> None:
    """A source built from a URL with a password puts it into this process's environment: undone after each
    test (setenv records the variable's absence, so the restore removes it)."""
    monkeypatch.setenv("VAULTFLOW_SOURCE_PASSWORD", "")
    monkeypatch.setenv("MYSQL_PWD", "")


@contextlib.contextmanager
def unique_name() -> Iterator[str]:
    """A unique database name, dropped at the end whatever created it."""
    name = f"vf_test_{uuid.uuid4().hex[:12]}"
    try:
        yield name
    finally:
        sql([f"DROP DATABASE IF EXISTS `{name}`"])


@pytest.fixture
def new_name() -> Iterator[str]:
    with unique_name() as name:
        yield name


@pytest.fixture
def bank() -> Iterator[str]:
    """A database of accounts (the sum of balances is invariant), a transfer log that grows with every
    transfer, a table of awkward values and an empty table; all InnoDB."""
    with unique_name() as name:
        make_bank(name)
        yield name


def make_bank(new_name: str) -> None:
    sql([f"CREATE DATABASE `{new_name}`"])
    sql(["CREATE TABLE accounts (id INT PRIMARY KEY, balance BIGINT NOT NULL) ENGINE=InnoDB",
         "CREATE TABLE transfers (id BIGINT AUTO_INCREMENT PRIMARY KEY, src INT NOT NULL, dst INT NOT NULL, "
         "amount INT NOT NULL, note VARCHAR(200)) ENGINE=InnoDB",
         "CREATE TABLE odd (id INT PRIMARY KEY, s TEXT, b BLOB) ENGINE=InnoDB",
         "CREATE TABLE empty (id INT, s TEXT) ENGINE=InnoDB",
         f"INSERT INTO accounts SELECT seq, {START} FROM seq_0_to_{ACCOUNTS - 1}",
         "INSERT INTO transfers (src, dst, amount, note) SELECT seq % 40, (seq + 1) % 40, 0, "
         f"CONCAT('seed ', seq, ' (it''s, a \\\\ seed)') FROM seq_1_to_{SEED_TRANSFERS}"], new_name)
    conn = connect(new_name)
    try:
        with conn.cursor() as cur:
            cur.executemany("INSERT INTO odd VALUES (%s, %s, %s)", ODD)
    finally:
        conn.close()


class Writers:
    """Threads that move money between accounts, one transaction per transfer, until the block ends."""

    def __init__(self, db: str, threads: int = 2) -> None:
        self.db, self.commits, self.errors = db, 0, []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def __enter__(self) -> Writers:
        for t in self._threads:
            t.start()
        while self.commits < 10 and not self.errors:  # running before the dump starts
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)
        assert not self.errors, self.errors

    def _run(self) -> None:
        rnd = random.Random()
        try:
            conn = connect(self.db, autocommit=False)
            with conn.cursor() as cur:
                while not self._stop.is_set():
                    a, b = rnd.sample(range(ACCOUNTS), 2)
                    amount = rnd.randint(1, 50)
                    for acct, delta in sorted([(a, -amount), (b, amount)]):  # one lock order: no deadlocks
                        cur.execute("UPDATE accounts SET balance = balance + %s WHERE id = %s", (delta, acct))
                    cur.execute("INSERT INTO transfers (src, dst, amount, note) VALUES (%s, %s, %s, %s)",
                                (a, b, amount, "it's (a), b\\c\n"))
                    conn.commit()
                    self.commits += 1
            conn.close()
        except Exception as e:  # noqa: BLE001 - reported by __exit__
            self.errors.append(repr(e))


def assert_bank_consistent(db: str) -> None:
    """The sum is what it started as, and every balance is exactly its start plus the transfers in the log."""
    assert sql(["SELECT SUM(balance) FROM accounts"], db) == [(ACCOUNTS * START,)]
    assert sql(["SELECT COUNT(*) FROM accounts a WHERE a.balance <> "
                f"{START} - (SELECT COALESCE(SUM(amount), 0) FROM transfers WHERE src = a.id) "
                "+ (SELECT COALESCE(SUM(amount), 0) FROM transfers WHERE dst = a.id)"], db) == [(0,)]
    assert sql(["SELECT id, s, b FROM odd ORDER BY id"], db) == ODD


def read_dump(reader: Any, key: bytes, out: Path, writers: Writers | None = None) -> int:
    """Read the stream in random small pieces, slowly enough that the writers commit while it is read; returns
    the commits made between the first byte and the end."""
    rnd = random.Random(1)
    with reader.open(key) as f, open(out, "wb") as o:
        o.write(f.read(1))
        before = writers.commits if writers else 0
        while chunk := f.read(rnd.randint(1, 16384)):
            o.write(chunk)
            time.sleep(0.001)
        return (writers.commits if writers else 0) - before


# -- the dump, its row counts and the restore side -------------------------------------------------------------

def test_dump_under_concurrent_transfers_restores_exactly_with_the_recorded_row_counts(bank, tmp_path):
    src = MariaDB([f"{SERVER}/{bank}"])
    src.check()
    key = f"{bank}.sql".encode()
    with Writers(bank) as writers, src.capture(tmp_path, []) as cap:
        assert cap.listing["path"].to_pylist() == [f"{bank}.sql"] and cap.tables == []
        spec = pickle.loads(pickle.dumps(src.spec(cap)))  # all a worker process gets
        assert spec.streams and spec.root == SERVER
        reader = MariaDB.reader(spec)
        during = read_dump(reader, key, tmp_path / "dump.sql", writers)
    assert during >= 5, "the writers must commit while the dump is read"
    recorded = {t["table"]: t["rows"] for t in reader.tables(key)}
    assert all(t["stream"] == f"{bank}.sql" and t["checksum"] is None for t in reader.tables(key))
    names = {n: f"{bank}.{n}" for n in ("accounts", "transfers", "odd", "empty")}
    assert set(recorded) == set(names.values())
    assert (recorded[names["accounts"]], recorded[names["odd"]], recorded[names["empty"]]) == (ACCOUNTS, len(ODD), 0)
    live = sql(["SELECT COUNT(*) FROM transfers"], bank)[0][0]
    assert SEED_TRANSFERS < recorded[names["transfers"]] < live  # counted in the dump's snapshot, not after it
    with src.scratch_database("unit") as scratch:
        target = scratch.url.rsplit("/", 1)[1]
        assert target.startswith("vf_scratch_unit_") and target in databases()
        assert scratch.load({f"{bank}.sql": tmp_path / "dump.sql"}, 2)
        assert scratch.count(list(recorded)) == recorded
        assert_bank_consistent(target)
    assert target not in databases()


ONE_LINE_DUMP = rb"""-- MySQL dump 10.13  Distrib 8.0
/*!40101 SET NAMES utf8mb4 */;
DROP TABLE IF EXISTS `t`;
CREATE TABLE `t` (
  `id` int NOT NULL,
  `s` text COMMENT 'INSERT INTO `t` VALUES (9)'
) ENGINE=InnoDB;
LOCK TABLES `t` WRITE;
INSERT INTO `t` VALUES (1,'a),(b'),(2,'it\'s; \\'),(3,NULL),(4,'(\n);\n'),(5,0x28293B0A);
INSERT INTO `t` VALUES (6,'\\\'),(\'');
UNLOCK TABLES;
CREATE TABLE `we``ird.name` (
  `x` int
);
INSERT INTO `we``ird.name` (`x`, `a``b`) VALUES (1,'x'),
(2,'y;'),
(3,'z');
CREATE TABLE `none` (`x` int);
/*!50001 CREATE VIEW `v` AS SELECT 1 AS `x` */;
DELIMITER ;;
CREATE PROCEDURE `p`()
BEGIN
CREATE TABLE `tmp` (x int);
INSERT INTO `tmp` VALUES (1),(2);
END ;;
DELIMITER ;
-- Dump completed on 2024-01-01 10:00:00"""


def test_row_counter_counts_tuples_across_every_read_boundary():
    """Both layouts (all tuples on one line, as MySQL writes; one per line, as MariaDB 10.11 does), strings
    holding what looks like syntax, a column list, routine bodies skipped, cut at every byte."""
    expected = {"t": 6, "we`ird.name": 3, "none": 0}
    for cut in range(len(ONE_LINE_DUMP) + 1):
        counter = _RowCounter()
        counter.feed(ONE_LINE_DUMP[:cut])
        counter.feed(ONE_LINE_DUMP[cut:])
        counter.close()
        assert counter.rows == expected, cut
        assert counter.last_line.startswith(b"-- Dump completed")
    bytewise = _RowCounter()
    for i in range(len(ONE_LINE_DUMP)):
        bytewise.feed(ONE_LINE_DUMP[i:i + 1])
    bytewise.close()
    assert bytewise.rows == expected


def test_url_forms_and_names():
    many = for_paths(["mysql://root@127.0.0.1:3306/?databases=a,b"])
    assert isinstance(many, MariaDB) and many.server.databases == ["a", "b"]
    assert many.default_name() == "127.0.0.1-a-b"
    with pytest.raises(SourceError, match="names no database"):
        MariaDB([SERVER + "/"]).check()
    with pytest.raises(SourceError, match="exactly one database"):
        many.count(["a.t"])


def test_several_databases_are_one_stream_each(bank, new_name, tmp_path):
    sql([f"CREATE DATABASE `{new_name}`", f"CREATE TABLE `{new_name}`.solo (x INT)",
         f"INSERT INTO `{new_name}`.solo VALUES (1), (2)"])
    src = for_paths([f"{SERVER}/?databases={bank},{new_name}"])
    with src.capture(tmp_path, []) as cap:
        assert cap.listing["path"].to_pylist() == sorted([f"{bank}.sql", f"{new_name}.sql"])
        reader = MariaDB.reader(src.spec(cap))
        read_dump(reader, f"{new_name}.sql".encode(), tmp_path / "solo.sql")
    assert reader.tables(f"{new_name}.sql".encode()) == [
        {"stream": f"{new_name}.sql", "table": f"{new_name}.solo", "rows": 2, "checksum": None}]


def test_count_maps_recorded_names_holding_dots_and_leaves_out_missing_tables(bank):
    with MariaDB([f"{SERVER}/{bank}"]).scratch_database("count") as scratch:
        target = scratch.url.rsplit("/", 1)[1]
        sql(["CREATE TABLE `a.b` (x INT)", "INSERT INTO `a.b` VALUES (1), (2), (3)", "CREATE TABLE b (x INT)",
             "INSERT INTO b VALUES (1)"], target)
        assert scratch.count(["src.x.a.b", "src.x.b", "src.x.gone"]) == {"src.x.a.b": 3, "src.x.b": 1}


def test_a_routine_of_another_collation_loads_into_another_name_without_the_original(new_name, tmp_path):
    """mariadb-dump wraps such a routine in `ALTER DATABASE `original` …`: loading must aim those at the target,
    or a restore test would alter the original database (and a restore elsewhere would fail)."""
    sql([f"CREATE DATABASE `{new_name}` CHARACTER SET latin1", f"CREATE PROCEDURE `{new_name}`.p() SELECT 1",
         f"CREATE TABLE `{new_name}`.t (x INT)", f"INSERT INTO `{new_name}`.t VALUES (1)",
         f"ALTER DATABASE `{new_name}` CHARACTER SET utf8mb4"])
    src = MariaDB([f"{SERVER}/{new_name}"])
    read_dump(MariaDB.reader(src.spec(_capture_of(src))), f"{new_name}.sql".encode(), tmp_path / "dump.sql")
    assert f"\nALTER DATABASE `{new_name}` CHARACTER SET latin1".encode() in (tmp_path / "dump.sql").read_bytes()
    sql([f"DROP DATABASE `{new_name}`"])
    with src.scratch_database("collation") as scratch:
        target = scratch.url.rsplit("/", 1)[1]
        scratch.load({f"{new_name}.sql": tmp_path / "dump.sql"}, 1)
        assert sql([f"SELECT ROUTINE_NAME FROM information_schema.ROUTINES WHERE ROUTINE_SCHEMA = '{target}'"]) \
            == [("p",)]
        assert sql([f"SELECT DEFAULT_CHARACTER_SET_NAME FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = "
                    f"'{target}'"]) == [("utf8mb4",)]  # as the original's, after the dump switched back
        assert scratch.count([f"{new_name}.t"]) == {f"{new_name}.t": 1}
    assert new_name not in databases()


def test_load_refuses_a_target_with_tables_and_several_dumps(bank, tmp_path):
    src = MariaDB([f"{SERVER}/{bank}"])
    dump = tmp_path / "d.sql"
    dump.write_text("CREATE TABLE x (id INT);\n")
    with pytest.raises(SourceError, match="already holds 4 tables"):
        src.load({"a.sql": dump}, 1)
    with src.scratch_database("refuse") as scratch:
        with pytest.raises(SourceError, match="choose one with --stream"):
            scratch.load({"a.sql": dump, "b.sql": dump}, 1)
        dump.write_text("CREATE TABLE x (id INT);\nINSERT INTO nowhere VALUES (1);\n")
        with pytest.raises(SourceError, match=r"status 1\): ERROR 1146 .*nowhere. doesn.t exist"):
            scratch.load({"a.sql": dump}, 1)


# -- failures: one line, nothing stored -------------------------------------------------------------------------

def one_line(e: pytest.ExceptionInfo[SourceError]) -> str:
    text = str(e.value)
    assert "\n" not in text
    return text


def fake_tool(folder: Path, name: str, body: str) -> Path:
    folder.mkdir(exist_ok=True)
    (folder / name).write_text(f"#!/bin/sh\n{body}\n")
    (folder / name).chmod(0o755)
    return folder


def test_closed_port_and_unknown_database_are_one_line_errors(bank):
    with pytest.raises(SourceError) as closed:
        MariaDB([f"mariadb://root@127.0.0.1:{free_port()}/{bank}"]).check()
    assert "cannot connect to mariadb://root@127.0.0.1:" in one_line(closed) and "server is running" in one_line(closed)
    with pytest.raises(SourceError) as unknown:
        MariaDB([f"{SERVER}/{bank}_missing"]).check()
    assert f"database {bank}_missing does not exist" in one_line(unknown)


@pytest.fixture
def user(bank) -> Iterator[tuple[str, str]]:
    """A user with a password (with URL-special characters) and every right on the bank."""
    name, password = f"vf_u_{uuid.uuid4().hex[:8]}", f"p@ss:w/rd;{uuid.uuid4().hex[:6]}"
    sql([f"CREATE USER '{name}'@'%' IDENTIFIED BY '{password}'", f"GRANT ALL ON `{bank}`.* TO '{name}'@'%'"])
    try:
        yield name, password
    finally:
        sql([f"DROP USER IF EXISTS '{name}'@'%'"])


def test_password_from_the_url_goes_to_the_environment_never_to_argv_or_errors(bank, user, tmp_path, monkeypatch):
    name, password = user
    wrong = f"wrong-{uuid.uuid4().hex[:8]}"
    bad = MariaDB([f"mariadb://{name}:{wrong}@127.0.0.1:3306/{bank}"])
    assert wrong not in repr(bad.paths) and os.environ["VAULTFLOW_SOURCE_PASSWORD"] == wrong
    with pytest.raises(SourceError) as denied:
        bad.check()
    assert "Access denied" in one_line(denied) and wrong not in one_line(denied)
    with pytest.raises(SourceError) as dump_denied:
        read_dump(MariaDB.reader(bad.spec(_capture_of(bad))), f"{bank}.sql".encode(), tmp_path / "x")
    assert "Access denied" in one_line(dump_denied) and wrong not in one_line(dump_denied)

    spy = fake_tool(tmp_path / "bin", "mariadb-dump",
                    f'printf "%s\\n" "$@" > {tmp_path}/argv; printf "%s" "$MYSQL_PWD" > {tmp_path}/pwd\n'
                    f'exec {REAL_DUMP} "$@"')
    monkeypatch.setenv("PATH", f"{spy}:{os.environ['PATH']}")
    good = MariaDB([f"mariadb://{name}:{quote(password, safe='')}@127.0.0.1:3306/{bank}"])
    assert password not in good.url and os.environ["VAULTFLOW_SOURCE_PASSWORD"] == password
    good.check()
    with good.capture(tmp_path, []) as cap:
        reader = MariaDB.reader(good.spec(cap))
        read_dump(reader, f"{bank}.sql".encode(), tmp_path / "dump.sql")
    assert {t["table"]: t["rows"] for t in reader.tables(f"{bank}.sql".encode())}[f"{bank}.odd"] == len(ODD)
    assert (tmp_path / "pwd").read_text() == password
    assert password not in (tmp_path / "argv").read_text() and f"--user={name}" in (tmp_path / "argv").read_text()


def _capture_of(src: MariaDB) -> Any:
    """The capture a check would refuse, built by hand: the reader must refuse on its own too."""
    from vaultflow.tasks.sources.base import Capture, stream_listing

    return Capture(listing=stream_listing([f"{d}.sql" for d in src.server.databases]), root=src.server.root)


def test_a_dump_killed_halfway_fails_naming_sigkill(bank, tmp_path, monkeypatch):
    src = MariaDB([f"{SERVER}/{bank}"])
    key = f"{bank}.sql".encode()
    killer = fake_tool(tmp_path / "bin", "mariadb-dump", f'{REAL_DUMP} "$@" | head -n 60\nkill -9 $$')
    monkeypatch.setenv("PATH", f"{killer}:{os.environ['PATH']}")
    src.check()  # the tool is there
    reader = MariaDB.reader(src.spec(_capture_of(src)))
    with pytest.raises(SourceError) as killed:
        read_dump(reader, key, tmp_path / "dump.sql")
    assert "killed by SIGKILL" in one_line(killed) and f"dump of database {bank}" in one_line(killed)
    assert reader.tables(key) == []


def test_a_dump_that_stops_early_with_status_0_is_refused(bank, tmp_path, monkeypatch):
    src = MariaDB([f"{SERVER}/{bank}"])
    short = fake_tool(tmp_path / "bin", "mariadb-dump", f'{REAL_DUMP} "$@" | head -n 60\nexit 0')
    monkeypatch.setenv("PATH", f"{short}:{os.environ['PATH']}")
    with pytest.raises(SourceError) as cut:
        read_dump(MariaDB.reader(src.spec(_capture_of(src))), f"{bank}.sql".encode(), tmp_path / "dump.sql")
    assert "without its '-- Dump completed' line" in one_line(cut)


def test_a_missing_dump_tool_is_a_clean_error(bank, tmp_path, monkeypatch):
    src = MariaDB([f"{SERVER}/{bank}"])
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(SourceError) as missing:
        src.check()
    assert "mariadb-dump (or mysqldump) is not installed" in one_line(missing)
    with pytest.raises(SourceError) as at_read:
        read_dump(MariaDB.reader(src.spec(_capture_of(src))), f"{bank}.sql".encode(), tmp_path / "dump.sql")
    assert "mariadb-dump is not installed" in one_line(at_read)


# -- end to end: the CLI, a real Prefect server ----------------------------------------------------------------

@pytest.fixture
def cli_env(tmp_path, prefect_server) -> dict[str, str]:
    env = {"VAULTFLOW_REPOSITORY": str(tmp_path / "repo"), "VAULTFLOW_PASSWORD": "pw",
           "VAULTFLOW_HOME": str(tmp_path / "home"), "PREFECT_API_URL": prefect_server}
    vaultflow(["init"], env)
    return env


def snapshots(env: dict[str, str]) -> list[dict[str, Any]]:
    return json.loads(vaultflow(["snapshots", "--json"], env).stdout)


def recorded_rows(env: dict[str, str], snapshot: str) -> dict[str, int]:
    repo = Repository.open(env["VAULTFLOW_REPOSITORY"], "pw")
    table = repo.databases_table(repo.snapshot(snapshot))
    return {r["table"]: r["rows"] for r in table.to_pylist()}


def assert_one_error_line(proc: subprocess.CompletedProcess[str], *words: str) -> None:
    assert proc.returncode != 0
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("vaultflow: error:")]
    assert len(errors) == 1, proc.stderr
    for w in words:
        assert w in errors[0], errors[0]


def test_cli_backup_of_a_live_database_is_consistent_and_a_second_adds_little(bank, cli_env, new_name, tmp_path):
    url = f"{SERVER}/{bank}"
    with Writers(bank) as writers:
        before = writers.commits
        vaultflow(["backup", url], cli_env)
        assert writers.commits > before
    first, = snapshots(cli_env)
    assert first["paths"] == [url] and first["stats"]["files"] == 1
    recorded = recorded_rows(cli_env, first["id"])
    assert recorded[f"{bank}.odd"] == len(ODD) and recorded[f"{bank}.empty"] == 0
    assert recorded[f"{bank}.transfers"] > SEED_TRANSFERS
    out = subprocess.run([sys.executable, "-m", "vaultflow", "restore", first["id"], "-", "--stream", f"{bank}.sql"],
                         env={**os.environ, **cli_env}, capture_output=True, timeout=300)
    assert out.returncode == 0, out.stderr
    dump = out.stdout
    (tmp_path / "dump.sql").write_bytes(dump)
    target = MariaDB([f"{SERVER}/{new_name}"])
    target.load({f"{bank}.sql": tmp_path / "dump.sql"}, 1)
    assert target.count(list(recorded)) == recorded
    assert_bank_consistent(new_name)

    vaultflow(["backup", url], cli_env)  # the writers have stopped: the database no longer changes
    vaultflow(["backup", url], cli_env)
    unchanged = snapshots(cli_env)[2]
    assert unchanged["stats"]["bytes"] > 1_000_000
    assert unchanged["stats"]["bytes_added"] < 0.05 * unchanged["stats"]["bytes"], unchanged["stats"]


def test_cli_failures_exit_with_one_error_line_and_commit_nothing(bank, cli_env, tmp_path):
    closed = vaultflow(["backup", f"mariadb://root@127.0.0.1:{free_port()}/{bank}"], cli_env, check=False)
    assert_one_error_line(closed, "cannot connect")
    missing = vaultflow(["backup", f"{SERVER}/{bank}_missing"], cli_env, check=False)
    assert_one_error_line(missing, f"database {bank}_missing does not exist")
    killer = fake_tool(tmp_path / "bin", "mariadb-dump", f'{REAL_DUMP} "$@" | head -n 60\nkill -9 $$')
    killed = vaultflow(["backup", f"{SERVER}/{bank}"], {**cli_env, "PATH": f"{killer}:{os.environ['PATH']}"},
                       check=False)
    assert_one_error_line(killed, "SIGKILL")
    assert snapshots(cli_env) == []


def test_cli_restore_to_database_and_restore_test(bank, cli_env, new_name):
    with Writers(bank):
        vaultflow(["backup", f"{SERVER}/{bank}"], cli_env)
    snap, = snapshots(cli_env)
    recorded = recorded_rows(cli_env, snap["id"])

    restored = vaultflow(["restore", snap["id"], "--to-database", f"{SERVER}/{new_name}"], cli_env)
    assert new_name in restored.stdout
    assert MariaDB([f"{SERVER}/{new_name}"]).count(list(recorded)) == recorded
    assert_bank_consistent(new_name)
    again = vaultflow(["restore", snap["id"], "--to-database", f"{SERVER}/{new_name}"], cli_env, check=False)
    assert_one_error_line(again, f"database {new_name}", "already holds 4 tables")

    scratch_before = {d for d in databases() if d.startswith("vf_scratch_")}
    tested = vaultflow(["restore-test", "--snapshot", snap["id"]], cli_env)
    assert f"{len(recorded)} tables, {sum(recorded.values()):,} rows, every count as recorded" in tested.stdout
    assert {d for d in databases() if d.startswith("vf_scratch_")} <= scratch_before  # dropped again
    rows = artifact_rows(cli_env["PREFECT_API_URL"], "restore-test-databases")
    assert {r["table"]: (r["rows recorded"], r["rows restored"], r["result"]) for r in rows} == {
        t: (n, n, "pass") for t, n in recorded.items()}


def artifact_rows(api: str, key: str) -> list[dict[str, Any]]:
    """The rows of the newest table artifact `key` on the Prefect server."""
    body = json.dumps({"artifacts": {"key": {"any_": [key]}}, "sort": "CREATED_DESC", "limit": 1}).encode()
    req = urllib.request.Request(f"{api}/artifacts/filter", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        found = json.load(resp)
    assert found, f"no artifact {key}"
    data = found[0]["data"]
    return json.loads(data) if isinstance(data, str) else data
