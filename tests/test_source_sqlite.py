"""The SQLite source: a consistent copy while other connections write, exact row counts, dedup of an unchanged
database, a restore that opens as the same database, and one-line refusals of what is not a database."""

from __future__ import annotations

import contextlib
import os
import random
import sqlite3
import threading
import time
from pathlib import Path

import pytest
from backup_helpers import read_back
from conftest import FAST_KDF

from vaultflow.storage.errors import SourceError
from vaultflow.storage.repository import Repository
from vaultflow.tasks.sources import for_paths
from vaultflow.tasks.sources import sqlite as sqlite_source
from vaultflow.tasks.sources.sqlite import SQLite

ACCOUNTS = 500
OPENING_BALANCE = 1_000


def make_bank(path: Path, journal_mode: str) -> None:
    """Accounts whose balances always sum to ACCOUNTS * OPENING_BALANCE, and a log with a row per transfer."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute(f"PRAGMA journal_mode={journal_mode}")
        conn.execute("CREATE TABLE accounts (id INTEGER PRIMARY KEY, balance INTEGER NOT NULL, pad BLOB)")
        conn.execute("CREATE TABLE transfers (id INTEGER PRIMARY KEY, src INTEGER, dst INTEGER, amount INTEGER)")
        conn.executemany("INSERT INTO accounts VALUES (?, ?, ?)",
                         [(i, OPENING_BALANCE, os.urandom(2000)) for i in range(ACCOUNTS)])  # ~1 MB: many pages
        conn.commit()


class Writers:
    """Threads moving money between accounts, each on its own connection, one transaction per transfer."""

    def __init__(self, path: Path, count: int = 2) -> None:
        self.path, self.stop, self.done = path, threading.Event(), [0] * count
        self.errors: list[str] = []
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(count)]

    def _run(self, i: int) -> None:
        rnd = random.Random(i)
        try:
            with contextlib.closing(sqlite3.connect(self.path, timeout=60, isolation_level=None)) as conn:
                while not self.stop.is_set():
                    a, b, amount = rnd.randrange(ACCOUNTS), rnd.randrange(ACCOUNTS), rnd.randrange(1, 50)
                    conn.execute("BEGIN IMMEDIATE")
                    conn.execute("UPDATE accounts SET balance = balance - ? WHERE id = ?", (amount, a))
                    conn.execute("UPDATE accounts SET balance = balance + ? WHERE id = ?", (amount, b))
                    conn.execute("INSERT INTO transfers (src, dst, amount) VALUES (?, ?, ?)", (a, b, amount))
                    conn.execute("COMMIT")
                    self.done[i] += 1
        except sqlite3.Error as e:
            self.errors.append(repr(e))

    def __enter__(self) -> Writers:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(120)


def transfers_now(path: Path) -> int:
    with contextlib.closing(sqlite3.connect(path, timeout=60)) as conn:
        return int(conn.execute("SELECT count(*) FROM transfers").fetchone()[0])


@pytest.mark.parametrize("journal_mode", ["wal", "delete"])
def test_a_copy_taken_while_transfers_commit_is_consistent_and_its_row_counts_exact(
        journal_mode, prefect_server, monkeypatch, tmp_path):
    from vaultflow.flows.backup import backup
    from vaultflow.flows.runtime import run_flow

    monkeypatch.setenv("VAULTFLOW_PASSWORD", "pw")
    monkeypatch.setattr(sqlite_source, "STEP_PAGES", 16)  # dozens of backup steps, with commits between them
    repo = Repository.init(str(tmp_path / "repo"), "pw", kdf=FAST_KDF)
    db = tmp_path / "bank.db"
    make_bank(db, journal_mode)
    with Writers(db) as writers:
        while sum(writers.done) < 50:  # the writers are committing before the backup starts
            time.sleep(0.01)
        before = transfers_now(db)
        summary = run_flow(backup, paths=[f"sqlite://{db}"], repository=repo.url)
        after = transfers_now(db)
    assert writers.errors == []
    assert after > before  # transfers went on committing while the backup ran

    assert summary.source == f"sqlite{str(db).replace('/', '-')}" and summary.files == 1
    _, record = repo.find_snapshot("latest")
    recorded = {r["table"]: r["rows"] for r in repo.databases_table(record).to_pylist()}
    assert set(r["stream"] for r in repo.databases_table(record).to_pylist()) == {"bank.db"}
    restored = tmp_path / "restored.db"
    restored.write_bytes(read_back(repo)[b"bank.db"])
    with contextlib.closing(sqlite3.connect(restored)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        total, accounts = conn.execute("SELECT sum(balance), count(*) FROM accounts").fetchone()
        logged = conn.execute("SELECT count(*) FROM transfers").fetchone()[0]
    assert (total, accounts) == (ACCOUNTS * OPENING_BALANCE, ACCOUNTS)
    assert recorded == {"accounts": ACCOUNTS, "transfers": logged} and before <= logged <= after


def test_a_second_backup_of_an_unchanged_database_adds_almost_nothing(prefect_server, monkeypatch, tmp_path):
    from vaultflow.flows.backup import backup
    from vaultflow.flows.runtime import run_flow

    monkeypatch.setenv("VAULTFLOW_PASSWORD", "pw")
    repo = Repository.init(str(tmp_path / "repo"), "pw", kdf=FAST_KDF)
    db = tmp_path / "big.db"
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.execute("CREATE TABLE blobs (id INTEGER PRIMARY KEY, data BLOB)")
        conn.executemany("INSERT INTO blobs (data) VALUES (?)", [(os.urandom(4000),) for _ in range(5000)])
        conn.commit()
    size = db.stat().st_size
    assert size > 20_000_000

    first = run_flow(backup, paths=[f"sqlite://{db}"], repository=repo.url)
    # worker processes read the copy the flow's process left on its scratch
    second = run_flow(backup, paths=[f"sqlite://{db}"], repository=repo.url, task_runner="processes")
    assert first.bytes_added > 0.9 * size
    assert second.bytes_read == size and second.bytes_added < 0.05 * size
    assert without_change_counters(read_back(repo)[b"big.db"]) == without_change_counters(db.read_bytes())


def without_change_counters(data: bytes) -> bytes:
    """A database file but the header fields a copy advances (file change counter, version-valid-for)."""
    return data[:24] + data[28:92] + data[100:]


def test_the_restore_side_writes_a_sound_file_and_counts_its_rows(tmp_path):
    db = tmp_path / "bank.db"
    make_bank(db, "wal")
    dump = tmp_path / "stream"
    with contextlib.closing(sqlite3.connect(db)) as src, contextlib.closing(sqlite3.connect(dump)) as dst:
        src.backup(dst)
    src_url = SQLite([f"sqlite://{db}"])
    with src_url.scratch_database("restore-test") as scratch:
        assert isinstance(scratch, SQLite) and not os.path.exists(scratch.path)
        [said] = scratch.load({"bank.db": dump}, jobs=1)
        assert scratch.path in said and "2 tables" in said
        assert scratch.count(["accounts", "transfers", "missing"]) == {"accounts": ACCOUNTS, "transfers": 0}
        folder = os.path.dirname(scratch.path)
        assert os.listdir(folder) == ["bank.db"]  # no temporary file left beside it
        with pytest.raises(SourceError, match="already exists and is not empty"):
            scratch.load({"bank.db": dump}, jobs=1)
    assert not os.path.exists(folder)

    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"SQLite format 3\x00" + os.urandom(8000))
    target = tmp_path / "out" / "x.db"
    target.parent.mkdir()
    with pytest.raises(SourceError, match="not a (sound )?SQLite database"):
        SQLite([f"sqlite://{target}"]).load({"x.db": garbage}, jobs=1)
    assert os.listdir(target.parent) == []


def test_check_refuses_a_missing_file_and_a_file_that_is_not_a_database_in_one_line(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not a database, just some words long enough to fill a header page\n" * 100)
    for path, expected in [(tmp_path / "missing.db", "no such file"), (text, "is not a readable SQLite database")]:
        with pytest.raises(SourceError, match=expected) as e:
            for_paths([f"sqlite://{path}"]).check()
        assert "\n" not in str(e.value) and str(path) in str(e.value)
    with pytest.raises(SourceError, match="absolute path") as e:
        for_paths(["sqlite://relative/x.db"]).check()
    assert "\n" not in str(e.value)



def test_a_stepwise_copy_reads_one_moment_though_a_transfer_commits_between_every_two_steps(monkeypatch, tmp_path):
    """The backup API restarts its copy whenever another connection commits between two steps; one read
    transaction held across the steps keeps the copy at the moment it began, and lets it end under steady writes."""
    monkeypatch.setattr(sqlite_source, "STEP_PAGES", 16)
    db = tmp_path / "bank.db"
    make_bank(db, "wal")
    steps: list[int] = []
    with contextlib.closing(sqlite3.connect(db, timeout=60, isolation_level=None)) as writer:
        def transfer_between_steps(left: int, total: int) -> None:
            steps.append(left)
            assert len(steps) < 10 * total // 16, "the copy keeps restarting"
            writer.execute("BEGIN IMMEDIATE")
            writer.execute("UPDATE accounts SET balance = balance - 7 WHERE id = 1")
            writer.execute("UPDATE accounts SET balance = balance + 7 WHERE id = 2")
            writer.execute("INSERT INTO transfers (src, dst, amount) VALUES (1, 2, 7)")
            writer.execute("COMMIT")

        counts = sqlite_source.snapshot_copy(str(db), tmp_path / "copy.db", transfer_between_steps)
    assert len(steps) > 10 and transfers_now(db) == len(steps)  # every step saw a commit after it
    assert counts == {"accounts": ACCOUNTS, "transfers": 0}
    with contextlib.closing(sqlite3.connect(tmp_path / "copy.db")) as conn:
        assert conn.execute("SELECT balance FROM accounts WHERE id IN (1, 2)").fetchall() == [(OPENING_BALANCE,)] * 2
