"""A stream comes back out verified: to stdout (`restore SNAPSHOT --stream NAME -`) and never as unproven bytes."""

from __future__ import annotations

import io
import json
import os

import pytest
from conftest import FAST_KDF
from test_cli_backup import vaultflow

from vaultflow.storage import dump
from vaultflow.storage.errors import IntegrityError, VaultflowError
from vaultflow.storage.repository import Repository


@pytest.fixture
def env(prefect_server, tmp_path) -> dict[str, str]:
    Repository.init(str(tmp_path / "repo"), "pw", kdf=FAST_KDF)
    return {"VAULTFLOW_REPOSITORY": str(tmp_path / "repo"), "VAULTFLOW_PASSWORD": "pw",
            "VAULTFLOW_HOME": str(tmp_path / "home"), "PREFECT_API_URL": prefect_server}


def test_a_commands_output_is_backed_up_and_comes_back_on_stdout_byte_for_byte(env, tmp_path):
    payload = tmp_path / "payload.bin"
    payload.write_bytes(os.urandom(3 << 20) + b"tail\n")
    vaultflow(["backup", "--stdin-from-command", f"cat {payload}", "--stdin-filename", "payload.bin",
               "--source", "cat"], env)
    snaps = json.loads(vaultflow(["snapshots", "--json"], env).stdout)
    assert [s["paths"] for s in snaps] == [[f"command[payload.bin]:cat {payload}"]]
    raw = vaultflow_bytes(["restore", "cat:latest", "--stream", "payload.bin", "-"], env)
    assert raw == payload.read_bytes()


def vaultflow_bytes(args: list[str], env: dict[str, str]) -> bytes:
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "vaultflow", *args], env={**os.environ, **env},
                          capture_output=True, stdin=subprocess.DEVNULL, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_an_unknown_stream_and_a_missing_name_are_one_line_errors(env, tmp_path):
    vaultflow(["backup", "--stdin-from-command", "echo hello", "--source", "echo"], env)
    wrong = vaultflow(["restore", "echo:latest", "--stream", "nope", "-"], env, check=False)
    assert wrong.returncode == 1 and "has no file or stream named 'nope'; it has: stdin" in wrong.stderr
    none = vaultflow(["restore", "echo:latest", "-"], env, check=False)
    assert none.returncode == 1 and "exactly one --stream NAME" in none.stderr


def test_content_that_does_not_hash_to_the_record_raises_before_anyone_trusts_it(tmp_path):
    repo = Repository.init(str(tmp_path / "repo"), "pw", kdf=FAST_KDF)
    session = repo.write_session()
    chunk = b"x" * 1000
    cid = repo.chunk_id(chunk)
    packer = session.packer()
    from vaultflow.storage.pack import BlobType

    session.claim([cid])
    packer.add(cid, BlobType.DATA, chunk)
    session.flush()
    session.write_index()
    session.close()
    row = {"path": "s", "chunks": [cid], "size": 1000, "content_hash": b"\0" * 32}
    with pytest.raises(IntegrityError, match="does not match the recorded hash"):
        dump.write_entry(repo, row, io.BytesIO())
    import blake3

    good = {**row, "content_hash": blake3.blake3(chunk, key=repo.master.file_hash_key).digest()}
    buf = io.BytesIO()
    assert dump.write_entry(repo, good, buf) == 1000 and buf.getvalue() == chunk
    with pytest.raises(IntegrityError):
        dump.write_entry(repo, {**good, "size": 999}, io.BytesIO())  # a truncated record is no proof either


def test_find_entry_refuses_folders_and_unread_files():
    import pyarrow as pa

    from vaultflow.storage.manifest import FILES_SCHEMA

    rows = [{"path": "d", "type": "dir"}, {"path": "bad", "type": "file", "chunks": None, "error": "gone"}]
    table = pa.Table.from_pylist([{n: r.get(n) for n in FILES_SCHEMA.names} for r in rows], schema=FILES_SCHEMA)
    with pytest.raises(VaultflowError, match="no file or stream named 'd'"):
        dump.find_entry(table, "d")
    with pytest.raises(VaultflowError, match="could not be read when it was backed up"):
        dump.find_entry(table, "bad")


def test_a_private_repository_seals_the_databases_table_too(prefect_server, monkeypatch, tmp_path):
    import sqlite3

    from vaultflow.flows.backup import backup
    from vaultflow.flows.runtime import run_flow

    db = tmp_path / "app.db"
    with sqlite3.connect(db) as c:
        c.execute("create table secret_customer_names (id integer)")
        c.executemany("insert into secret_customer_names values (?)", [(i,) for i in range(7)])
    monkeypatch.setenv("VAULTFLOW_PASSWORD", "pw")
    repo = Repository.init(str(tmp_path / "repo"), "pw", kdf=FAST_KDF, private_manifests=True)
    run_flow(backup, paths=[f"sqlite://{db}"], repository=repo.url)
    [record] = Repository.open(repo.url, "pw").snapshots().values()
    [name] = [n for n in record.manifests if n.startswith("tables/databases/")]
    assert name.endswith(".parquet.enc") and b"secret_customer_names" not in repo.backend.read(name)
    table = Repository.open(repo.url, "pw").databases_table(record)
    assert table.to_pylist() == [{"stream": "app.db", "table": "secret_customer_names", "rows": 7, "checksum": None}]
