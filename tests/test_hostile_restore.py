"""Hostile manifests, written with the repository's own keys, cannot make restore write outside its target."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pyarrow as pa
import pytest
from conftest import FAST_KDF

from vaultflow.storage import manifest
from vaultflow.storage.errors import VaultflowError
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


def test_a_path_listed_twice_is_refused_and_no_link_target_outside_is_chmodded(tmp_path):
    """A file row and a symlink row at one path: the file's mode must not land on the link's target."""
    repo = Repository.init(str(tmp_path / "repo"), "pw", kdf=FAST_KDF)
    secret = tmp_path / "outside" / "secret"
    secret.parent.mkdir()
    secret.write_bytes(b"secret")
    secret.chmod(0o600)
    record = malicious_snapshot(repo, [
        {"path": "f", "type": "file", "mode": 0o100666},
        {"path": "f", "type": "symlink", "link_target": os.fsencode(secret)},
        {"path": "ok.txt", "type": "file"},
    ])
    target = tmp_path / "target"
    result = Restorer(repo, repo.files_table(record), str(target), overwrite=True).run()
    assert result.failed == {"f": "'f': appears 2 times in the manifest; refused"}
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600 and secret.read_bytes() == b"secret"
    assert not os.path.lexists(target / "f")
    assert (target / "ok.txt").read_bytes() == b"pwned"


def test_a_path_below_a_file_is_refused(tmp_path):
    repo = Repository.init(str(tmp_path / "repo"), "pw", kdf=FAST_KDF)
    record = malicious_snapshot(repo, [{"path": "f", "type": "file"}, {"path": "f/below", "type": "file"}])
    result = Restorer(repo, repo.files_table(record), str(tmp_path / "target")).run()
    assert result.failed == {"f/below": "'f/below': passes through the file 'f'; refused"}
    assert (tmp_path / "target" / "f").read_bytes() == b"pwned"


@pytest.mark.parametrize("keep", [False, True])
def test_setid_bits_are_restored_only_when_asked(tmp_path, keep):
    repo = Repository.init(str(tmp_path / "repo"), "pw", kdf=FAST_KDF)
    record = malicious_snapshot(repo, [{"path": "suid", "type": "file", "mode": 0o104755},
                                       {"path": "sgid", "type": "file", "mode": 0o102750},
                                       {"path": "sticky", "type": "file", "mode": 0o101644}])
    target = tmp_path / "target"
    result = Restorer(repo, repo.files_table(record), str(target), keep_setid=keep).run()
    assert result.ok and result.files == 3
    modes = {name: stat.S_IMODE(os.lstat(target / name).st_mode) for name in ("suid", "sgid", "sticky")}
    assert modes == ({"suid": 0o4755, "sgid": 0o2750, "sticky": 0o1644} if keep else
                     {"suid": 0o755, "sgid": 0o750, "sticky": 0o1644})


def test_setid_bits_are_kept_by_default_only_for_root(tmp_path):
    repo = Repository.init(str(tmp_path / "repo"), "pw", kdf=FAST_KDF)
    record = malicious_snapshot(repo, [{"path": "f", "type": "file"}])
    restorer = Restorer(repo, repo.files_table(record), str(tmp_path / "target"))
    assert restorer.keep_setid is (os.geteuid() == 0)
    assert Restorer(repo, repo.files_table(record), "t", keep_setid=False).restored_mode(0o106775) == 0o775


def test_a_target_that_is_a_file_or_a_symlink_is_refused_with_a_clear_error(tmp_path):
    repo = Repository.init(str(tmp_path / "repo"), "pw", kdf=FAST_KDF)
    table = repo.files_table(malicious_snapshot(repo, [{"path": "f", "type": "file"}]))
    file = tmp_path / "file"
    file.write_bytes(b"precious")
    with pytest.raises(VaultflowError, match=f"{file} exists and is not a directory"):
        Restorer(repo, table, str(file)).run()
    with pytest.raises(VaultflowError, match="cannot create the restore folder"):
        Restorer(repo, table, str(file / "below")).run()
    assert file.read_bytes() == b"precious"
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(VaultflowError, match="is a symbolic link"):
        Restorer(repo, table, str(tmp_path / "link")).run()
    assert list(real.iterdir()) == []
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(VaultflowError, match="is a symbolic link"):
        Restorer(repo, table, str(tmp_path / "dangling")).run()
    assert not (tmp_path / "nowhere").exists()
