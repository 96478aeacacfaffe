"""S3 Object Lock: every immutable object is retained by the store itself, deletes before expiry are refused and
reported as pending, and retention grows object by object."""

from __future__ import annotations

import time
import uuid

import boto3
import pytest
from conftest import FAST_KDF

from vaultflow.storage.errors import ObjectLocked, ObjectLockError
from vaultflow.storage.repository import Repository


def client(s3_server):
    return boto3.client("s3", endpoint_url=s3_server.endpoint, aws_access_key_id="testing",
                        aws_secret_access_key="testing", region_name="us-east-1")


@pytest.fixture
def locked_bucket(s3_server) -> str:
    name = f"vf-lock-{uuid.uuid4().hex[:10]}"
    client(s3_server).create_bucket(Bucket=name, ObjectLockEnabledForBucket=True)
    return name


def store(repo: Repository) -> str:
    session = repo.write_session()
    from vaultflow.storage.pack import BlobType

    chunk = b"locked data " * 1000
    cid = repo.chunk_id(chunk)
    session.claim([cid])
    session.packer().add(cid, BlobType.DATA, chunk)
    session.flush()
    session.write_index()
    session.close()
    [(pack, _)] = list(repo.backend.list("data"))
    return pack


def test_every_immutable_object_is_retained_and_a_delete_is_refused_not_hidden(s3_server, locked_bucket):
    url = f"s3://{locked_bucket}/repo"
    repo = Repository.init(url, "pw", storage_options=s3_server.storage_options, kdf=FAST_KDF,
                           object_lock=("compliance", 2))
    pack = store(Repository.open(url, "pw", storage_options=s3_server.storage_options))
    repo = Repository.open(url, "pw", storage_options=s3_server.storage_options)
    assert repo.config.object_lock == {"mode": "COMPLIANCE", "days": 2}
    for name in ("config", pack, next(n for n, _ in repo.backend.list("index"))):
        until = repo.backend.retained_until(name)
        assert until is not None and 1.9 * 86400 < until - time.time() <= 2 * 86400, name
    with pytest.raises(ObjectLocked, match="retained by Object Lock until"):
        repo.backend.delete(pack)
    assert repo.backend.exists(pack) and repo.load_blob(repo.index.entries().__next__()[1].id)  # still readable


def test_retention_is_extended_for_one_object_only_as_far_as_asked(s3_server, locked_bucket):
    url = f"s3://{locked_bucket}/repo"
    Repository.init(url, "pw", storage_options=s3_server.storage_options, kdf=FAST_KDF,
                    object_lock=("governance", 1))
    repo = Repository.open(url, "pw", storage_options=s3_server.storage_options)
    pack = store(repo)
    index = next(n for n, _ in repo.backend.list("index"))
    before = repo.backend.retained_until(index)
    repo.backend.extend_retention(pack, time.time() + 3 * 86400)
    assert repo.backend.retained_until(pack) > time.time() + 2.9 * 86400
    assert repo.backend.retained_until(index) == before  # only the object asked for


def test_object_lock_is_refused_where_the_store_cannot_keep_it(s3_server, tmp_path):
    plain = s3_server.new_bucket()
    with pytest.raises(ObjectLockError, match="Object Lock"):
        Repository.init(f"s3://{plain}/repo", "pw", storage_options=s3_server.storage_options, kdf=FAST_KDF,
                        object_lock=("compliance", 1))
    with pytest.raises(ObjectLockError, match="needs S3"):
        Repository.init(str(tmp_path / "repo"), "pw", kdf=FAST_KDF, object_lock=("compliance", 1))
    with pytest.raises(ValueError, match="GOVERNANCE or COMPLIANCE"):
        Repository.init(str(tmp_path / "r2"), "pw", kdf=FAST_KDF, object_lock=("forever", 1))


def test_a_repository_without_object_lock_keeps_its_config_bytes(tmp_path):
    repo = Repository.init(str(tmp_path / "repo"), "pw", kdf=FAST_KDF)
    assert b"object_lock" not in repo.backend.read("config")
    assert Repository.open(repo.url, "pw").config.object_lock is None


def test_prune_extends_only_what_is_still_needed_and_only_when_it_would_end_soon(s3_server, locked_bucket):
    from vaultflow.storage import maintenance
    from vaultflow.storage.object_lock import extend_needed

    url = f"s3://{locked_bucket}/repo"
    Repository.init(url, "pw", storage_options=s3_server.storage_options, kdf=FAST_KDF,
                    object_lock=("governance", 2))
    repo = Repository.open(url, "pw", storage_options=s3_server.storage_options)
    kept = store(repo)
    assert extend_needed(repo) == (4, 0)  # config, key, index file, pack: all retained 2 days, nothing ends soon
    pack_until = repo.backend.retained_until(kept)

    _, data = maintenance.encode(repo, {kept: "2026-11-25T00:00:00Z"})  # now a deletion candidate
    from vaultflow.storage.crypto import content_hash

    repo.backend.write(f"maintenance/candidates-{content_hash(data)}", data, content_named=True)
    later = time.time() + 1.5 * 86400  # a day and a half on: everything needed ends within half the period
    looked, extended = extend_needed(repo, later)
    assert (looked, extended) == (4, 4)  # config, key, index file, the candidates object: not the candidate
    assert repo.backend.retained_until(kept) == pack_until  # released data is not kept longer
    assert repo.backend.retained_until("config") > later + 1.9 * 86400
