"""The repository façade on local disk and S3: init/open, keys, blobs, crash resume, tamper detection, locks."""

from __future__ import annotations

import json
import os
import time

import pytest
from conftest import FAST_KDF

from vaultflow.storage.backend import Backend
from vaultflow.storage.errors import (
    IntegrityError,
    NotARepository,
    ObjectMissing,
    RepositoryExists,
    RepositoryLocked,
    VaultflowError,
    WrongPassword,
)
from vaultflow.storage.lock import LockInfo
from vaultflow.storage.pack import BlobType
from vaultflow.storage.repository import Repository
from vaultflow.storage.snapshot import SnapshotRecord, utc_now


def make(location, **kw) -> Repository:
    return Repository.init(location.url, "pw", storage_options=location.storage_options, kdf=FAST_KDF,
                           pack_size=1 << 20, **kw)


def reopen(location, password: str = "pw") -> Repository:
    return Repository.open(location.url, password, storage_options=location.storage_options)


def store(repo: Repository, blobs: list[bytes], write_index: bool = True) -> list[bytes]:
    session = repo.write_session()
    packer = session.packer()
    ids = [repo.chunk_id(b) for b in blobs]
    for bid, blob, mine in zip(ids, blobs, session.claim(ids), strict=True):
        if mine:
            packer.add(bid, BlobType.DATA, blob)
    packer.flush()
    session.drain()  # packs are written by a background thread
    if write_index:
        session.write_index()
    return ids


def test_init_open_and_refusals(location):
    repo = make(location)
    assert reopen(location).config == repo.config
    with pytest.raises(RepositoryExists):
        make(location)
    with pytest.raises(WrongPassword, match="wrong password"):
        reopen(location, "nope")
    with pytest.raises(NotARepository, match="vaultflow init"):
        Repository.open(location.url + "-elsewhere", "pw", storage_options=location.storage_options)


def test_keys_add_change_and_remove(location):
    repo = make(location)
    second = repo.add_key("second", FAST_KDF)
    assert reopen(location, "second").master.raw == repo.master.raw
    repo.change_password("third", FAST_KDF)
    with pytest.raises(WrongPassword):
        reopen(location, "pw")
    assert reopen(location, "third").master.raw == repo.master.raw
    repo.remove_key(second)
    with pytest.raises(WrongPassword):
        reopen(location, "second")
    with pytest.raises(VaultflowError, match="only key"):
        repo.remove_key(repo.key_name)


def test_blobs_round_trip_and_deduplicate(location):
    repo = make(location)
    blobs = [os.urandom(300_000) for _ in range(6)] + [b"text " * 100_000]
    ids = store(repo, blobs)
    again = repo.write_session()
    assert again.claim(ids) == [False] * len(ids)  # known content is not stored twice
    fresh = reopen(location)
    assert [fresh.load_blob(i) for i in ids] == blobs
    assert len(list(fresh.backend.list("data"))) >= 2  # 1 MiB packs: the data spread over several


def test_chunk_ids_are_keyed_per_repository(location, tmp_path):
    a = make(location)
    b = Repository.init(str(tmp_path / "other"), "pw", kdf=FAST_KDF)
    assert a.chunk_id(b"same") != b.chunk_id(b"same")


def test_a_resumed_run_adopts_uploaded_packs_instead_of_uploading_again(location):
    repo = make(location)
    blobs = [os.urandom(400_000) for _ in range(5)]
    ids = store(repo, blobs, write_index=False)  # crash after the packs, before the index
    packs_before = list(repo.backend.list("data"))
    fresh = reopen(location)
    assert fresh.index.contains_many(ids) == [False] * 5
    session = fresh.write_session()
    assert session.adopt_orphan_packs() == len(packs_before)
    assert session.claim(ids) == [False] * 5
    session.write_index()
    assert list(fresh.backend.list("data")) == packs_before
    assert [reopen(location).load_blob(i) for i in ids] == blobs


def corrupt(backend: Backend, name: str, at: int) -> None:
    data = bytearray(backend.read(name))
    data[at % len(data)] ^= 0x10
    backend.delete(name)
    backend.write(name, bytes(data))


def test_damaged_pack_is_reported_by_name(location):
    repo = make(location)
    ids = store(repo, [os.urandom(1000), os.urandom(1000)])
    [(pack, _)] = list(repo.backend.list("data"))
    corrupt(repo.backend, pack, 100)
    fresh = reopen(location)
    with pytest.raises(IntegrityError, match=pack):
        fresh.read_pack(pack)
    with pytest.raises(IntegrityError, match=pack):
        fresh.load_blob(ids[0])
    assert fresh.load_blob(ids[1])  # the other blob in the damaged pack still reads


def test_truncated_and_missing_packs_are_reported_by_name(location):
    repo = make(location)
    ids = store(repo, [os.urandom(1000)])
    [(pack, size)] = list(repo.backend.list("data"))
    data = repo.backend.read(pack)
    repo.backend.delete(pack)
    repo.backend.write(pack, data[: size - 30])
    with pytest.raises(IntegrityError, match=pack):
        reopen(location).read_pack(pack)
    repo.backend.delete(pack)
    with pytest.raises(ObjectMissing, match=pack.split("/")[-1]):
        reopen(location).load_blob(ids[0])


def test_damaged_index_file_is_named_and_behaves_like_a_missing_one(location):
    """One bad index file used to stop every restore and backup; its packs' trailers stand in for it."""
    repo = make(location)
    first = store(repo, [os.urandom(1000)])
    [(name, _)] = list(repo.backend.list("index"))
    second = store(repo, [os.urandom(2000)])
    corrupt(repo.backend, name, 60)
    with pytest.raises(IntegrityError, match=name):
        reopen(location).read_index_file(name)
    again = reopen(location)
    assert len(again.index) == 2 and name in again.damaged_index_files
    assert len(again.load_blob(first[0])) == 1000 and len(again.load_blob(second[0])) == 2000


def test_tampered_config_and_key_file_are_reported(location):
    repo = make(location)
    cfg = json.loads(repo.backend.read("config"))
    cfg["vaultflow_repository"]["pack_size"] = 1 << 21
    repo.backend.delete("config")
    repo.backend.write("config", json.dumps(cfg).encode())
    with pytest.raises(IntegrityError, match="config"):
        reopen(location)
    corrupt(repo.backend, repo.key_name, 40)
    with pytest.raises(IntegrityError, match=repo.key_name):
        reopen(location)


def test_snapshot_records_commit_and_tampering_is_named(location):
    repo = make(location)
    rec = SnapshotRecord(source="home", serial=1, started=utc_now(), finished=utc_now(), host="h", parent=None,
                         previous=None, manifests={})
    rid = repo.commit(rec)
    assert reopen(location).snapshots() == {rid: rec}
    assert repo.latest("home") == (rid, rec) and repo.latest("other") is None
    corrupt(repo.backend, f"snapshots/{rid}", 30)
    again = reopen(location)
    assert again.snapshots() == {}  # a damaged record is set aside and named, never returned
    assert again.damaged_records[rid].name == f"snapshots/{rid}"
    with pytest.raises(IntegrityError, match=f"snapshots/{rid}"):
        again.snapshot(rid)


def test_tampered_object_is_detected_against_its_recorded_hash(location):
    repo = make(location)
    digest = repo.write_object("manifests/source=a/snapshot=1/files.parquet", b"PAR1 table")
    assert repo.read_object("manifests/source=a/snapshot=1/files.parquet", digest) == b"PAR1 table"
    corrupt(repo.backend, "manifests/source=a/snapshot=1/files.parquet", 3)
    with pytest.raises(IntegrityError, match="files.parquet"):
        repo.read_object("manifests/source=a/snapshot=1/files.parquet", digest)


def test_locks_shared_exclusive_and_stale(location):
    repo = make(location)
    with repo.lock(purpose="backup a"), repo.lock(purpose="backup b"):  # writers share
        with pytest.raises(RepositoryLocked, match="shared lock .* 'backup"):
            repo.lock(exclusive=True, purpose="prune").acquire()
    with repo.lock(exclusive=True, purpose="prune"):
        with pytest.raises(RepositoryLocked, match="exclusive lock .* 'prune'"):
            repo.lock(purpose="backup").acquire()
    assert list(repo.backend.list("locks")) == []
    with repo.lock(purpose="backup", scope="source:home"), repo.lock(purpose="backup", scope="source:db"):
        with pytest.raises(RepositoryLocked, match=r"\(source:home\)"):
            repo.lock(purpose="backup", scope="source:home").acquire()
    old = LockInfo(exclusive=True, host="elsewhere", pid=1, created=0.0, refreshed=time.time() - 3600, purpose="x")
    repo.backend.replace("locks/stale", json.dumps(old.__dict__).encode())
    with repo.lock(purpose="backup"):  # a lock not refreshed for its timeout no longer counts
        pass
    assert list(repo.backend.list("locks")) == []
