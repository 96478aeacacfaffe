"""One damaged snapshot record is set aside and named; every other record, of any source, stays usable."""

from __future__ import annotations

import json

import pytest
from conftest import FAST_KDF

from vaultflow.storage import manifest
from vaultflow.storage.errors import IntegrityError
from vaultflow.storage.repository import Repository
from vaultflow.storage.snapshot import SnapshotRecord


def make(location, private: bool = False) -> Repository:
    return Repository.init(location.url, "pw", storage_options=location.storage_options, kdf=FAST_KDF,
                           pack_size=1 << 20, private_manifests=private)


def reopen(location) -> Repository:
    return Repository.open(location.url, "pw", storage_options=location.storage_options)


def commit(repo: Repository, source: str, serial: int, previous: str | None) -> str:
    """A record with a real files manifest holding one file named after the source."""
    row = {"path": f"{source}.txt", "raw_path": None, "type": "file", "size": 1, "mode": 0o100644, "uid": 0,
           "gid": 0, "mtime_ns": 0, "ctime_ns": 0, "inode": 1, "dev": 1, "nlink": 1, "link_target": None,
           "content_hash": None, "chunks": None, "status": "new", "error": None}
    data = manifest.to_parquet(manifest.table_from_rows([row], manifest.FILES_SCHEMA))
    name = manifest.content_named(manifest.files_name(source, serial), data)
    digest = repo.write_object(name, data)
    t = f"2026-11-25T10:{serial:02d}:00.000000Z"
    return repo.commit(SnapshotRecord(source=source, serial=serial, started=t, finished=t, host="h",
                                      parent=previous, previous=previous, manifests={name: digest}))


def flip(repo: Repository, rid: str, at: int) -> None:
    name = f"snapshots/{rid}"
    data = bytearray(repo.backend.read(name))
    data[at] ^= 0x01
    repo.backend.delete(name)
    repo.backend.write(name, bytes(data))


def test_a_flipped_bit_in_one_record_blocks_no_other_source(location):
    repo = make(location)
    a1 = commit(repo, "a", 1, None)
    a2 = commit(repo, "a", 2, a1)
    b1 = commit(repo, "b", 1, None)
    b2 = commit(repo, "b", 2, b1)
    flip(repo, a1, 40)  # inside the JSON body: still parses, so the claimed source and serial can be peeked
    repo = reopen(location)

    records = repo.snapshots()
    assert set(records) == {a2, b1, b2}
    damaged = repo.damaged_records[a1]
    assert damaged.name == f"snapshots/{a1}" and "hash" in damaged.reason
    assert (damaged.source, damaged.serial) == ("a", 1)

    rid, rec = repo.find_snapshot("b:latest")
    assert rid == b2 and rec.serial == 2
    assert repo.find_snapshot("a:latest")[0] == a2
    assert repo.find_snapshot(b1)[0] == b1
    assert reopen(location).find_snapshot(b1)[0] == b1  # a full id reads one record, without listing
    assert repo.files_table(rec)["path"].to_pylist() == ["b.txt"]
    assert repo.snapshot(a2).serial == 2
    assert repo.latest("a") == (a2, records[a2])
    with pytest.raises(IntegrityError, match=f"snapshots/{a1}"):
        repo.find_snapshot(a1)
    with pytest.raises(IntegrityError, match=f"snapshots/{a1}"):
        reopen(location).find_snapshot(a1)


def test_a_damaged_newest_record_keeps_its_serial_from_reuse(location):
    repo = make(location)
    a1 = commit(repo, "a", 1, None)
    a2 = commit(repo, "a", 2, a1)
    flip(repo, a2, 60)
    repo = reopen(location)
    assert set(repo.snapshots()) == {a1}
    assert repo.damaged_records[a2].serial == 2
    assert repo.next_serial("a") == 3  # the damaged head is reported, its serial never taken again
    assert repo.next_serial("b") == 1


def test_a_deeply_nested_record_is_reported_not_a_crash(location):
    repo = make(location)
    good = commit(repo, "a", 1, None)
    nested = b"[" * 100_000 + b"]" * 100_000
    bomb = json.dumps({"record": "x"}).encode().replace(b'"x"', nested)
    from vaultflow.storage.crypto import content_hash

    bad = content_hash(bomb)
    repo.backend.write(f"snapshots/{bad}", bomb, content_named=True)
    assert set(repo.snapshots()) == {good}
    assert repo.damaged_records[bad].name == f"snapshots/{bad}"
    assert repo.damaged_records[bad].source is None
    assert repo.find_snapshot("latest")[0] == good


def test_a_private_repository_seals_its_records_and_a_retried_commit_names_the_same_object(location):
    repo = make(location, private=True)
    rec = SnapshotRecord(source="a", serial=1, started="2026-11-25T10:00:00.000000Z",
                         finished="2026-11-25T10:00:01.000000Z", host="build-host-42", parent=None, previous=None,
                         manifests={}, stats={"bytes_read": 31337}, paths=["/srv/secret-project"])
    rid = repo.commit(rec)
    assert repo.commit(rec) == rid
    data = repo.backend.read(f"snapshots/{rid}")
    assert b"secret-project" not in data and b"build-host-42" not in data and b"31337" not in data
    assert reopen(location).snapshots() == {rid: rec}
    assert reopen(location).find_snapshot("a:1") == (rid, rec)
