"""Hostile manifests, written with the repository's own keys, cannot make restore write outside its target."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pytest
from conftest import FAST_KDF

from vaultflow.storage import manifest
from vaultflow.storage.pack import BlobType
from vaultflow.storage.repository import Repository
from vaultflow.storage.restorer import HostilePath, Restorer, check_path
from vaultflow.storage.snapshot import SnapshotRecord, utc_now


def malicious_snapshot(repo: Repository, rows: list[dict]) -> SnapshotRecord:  # type: ignore[type-arg]
    """A snapshot whose manifest holds `rows`; every file's content is b'pwned'."""
    session = repo.write_session()
    cid = repo.chunk_id(b"pwned")
    if session.claim([cid])[0]:
        session.packer().add(cid, BlobType.DATA, b"pwned")
    session.flush()
    session.write_index()
    import blake3

    content = blake3.blake3(b"pwned", key=repo.master.file_hash_key).digest()
    base = {"raw_path": None, "size": 5, "mode": 0o100644, "uid": 0, "gid": 0, "mtime_ns": 0, "ctime_ns": 0,
            "inode": 1, "dev": 1, "nlink": 1, "link_target": None, "content_hash": content, "chunks": [cid],
            "status": "new", "error": None}
    full = [{**base, **r} for r in rows]
    for r in full:
        if r["type"] != "file":
            r.update(size=0, chunks=None, content_hash=None, mode=0o40755 if r["type"] == "dir" else 0o120777)
    table = pa.Table.from_pylist(full, schema=manifest.FILES_SCHEMA)
    name = manifest.files_name("evil", 1)
    digest = repo.write_object(name, manifest.to_parquet(table))
    record = SnapshotRecord(source="evil", serial=1, started=utc_now(), finished=utc_now(), host="attacker",
                            parent=None, previous=None, manifests={name: digest})
    repo.commit(record)
    return record


@pytest.mark.parametrize("raw", [b"../escape", b"/etc/evil", b"a/../../escape", b"a/./b", b"a//b", b"nul\x00byte",
                                 b"", b"..", b"a/.."])
def test_hostile_names_are_refused(raw):
    with pytest.raises(HostilePath):
        check_path(raw)


def test_restore_refuses_escapes_and_paths_through_symlinks(tmp_path):
    repo = Repository.init(str(tmp_path / "repo"), "pw", kdf=FAST_KDF)
    outside = tmp_path / "outside"
    outside.mkdir()
    record = malicious_snapshot(repo, [
        {"path": "../escaped.txt", "type": "file"},
        {"path": "/tmp/absolute-escape.txt", "type": "file"},
        {"path": "ok/../../dotdot.txt", "type": "file"},
        {"path": "link", "type": "symlink", "link_target": os.fsencode(outside)},
        {"path": "link/through-link.txt", "type": "file"},
        {"path": "x", "type": "file", "raw_path": b"nul\x00name"},
        {"path": "ok", "type": "dir"},
        {"path": "ok/fine.txt", "type": "file"},
    ])
    target = tmp_path / "target"
    result = Restorer(repo, repo.files_table(record), str(target)).run()
    assert set(result.failed) == {"../escaped.txt", "/tmp/absolute-escape.txt", "ok/../../dotdot.txt",
                                  "link/through-link.txt", "x"}
    assert all("refused" in why for why in result.failed.values())
    assert (target / "ok" / "fine.txt").read_bytes() == b"pwned"  # the honest entries still restore
    assert os.readlink(target / "link") == str(outside)  # the link itself is restored, as a link
    assert list(outside.iterdir()) == []
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path / "dotdot.txt").exists()
    assert not Path("/tmp/absolute-escape.txt").exists()


def test_a_symlink_in_the_target_is_never_followed(tmp_path):
    """Even when the target already holds a link where the manifest has a directory (--overwrite)."""
    repo = Repository.init(str(tmp_path / "repo"), "pw", kdf=FAST_KDF)
    outside = tmp_path / "outside"
    outside.mkdir()
    record = malicious_snapshot(repo, [{"path": "d", "type": "dir"}, {"path": "d/f.txt", "type": "file"}])
    target = tmp_path / "target"
    target.mkdir()
    os.symlink(outside, target / "d")
    result = Restorer(repo, repo.files_table(record), str(target), overwrite=True).run()
    assert "d" in result.failed and "d/f.txt" in result.failed
    assert list(outside.iterdir()) == []
