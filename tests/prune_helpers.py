"""Helpers for prune tests: packs and snapshots built with the storage APIs, forget by tombstone, and the proofs
(check passes, every snapshot restores byte for byte, which objects exist)."""

from __future__ import annotations

import os

import blake3
import pyarrow as pa
from conftest import FAST_KDF

from vaultflow.storage import manifest, retention
from vaultflow.storage.checker import Checker
from vaultflow.storage.errors import ObjectLocked
from vaultflow.storage.pack import BlobType
from vaultflow.storage.repository import Repository
from vaultflow.storage.snapshot import SnapshotRecord, utc_now

DAY = 86400.0


def new_repo(location) -> Repository:  # type: ignore[no-untyped-def]
    return Repository.init(location.url, "pw", storage_options=location.storage_options, kdf=FAST_KDF)


def local(tmp_path) -> Repository:  # type: ignore[no-untyped-def]
    return Repository.init(str(tmp_path / "repo"), "pw", kdf=FAST_KDF)


def reopen(repo: Repository) -> Repository:
    """Another client of the same repository (its own index, loaded from storage)."""
    return Repository.open(repo.url, "pw", storage_options=repo.backend.fs.storage_options)


def packs(repo: Repository) -> set[str]:
    return {name for name, _ in repo.backend.list("data")}


def store(repo: Repository, blobs: list[bytes]) -> str:
    """One new pack holding `blobs` as data chunks, with its index file (as one backup batch writes them)."""
    before = packs(repo)
    session = repo.write_session()
    packer = session.packer()
    for blob in blobs:
        packer.add(repo.chunk_id(blob), BlobType.DATA, blob)
    session.flush()
    session.write_index()
    session.close()
    [new] = packs(repo) - before
    return new


def commit(repo: Repository, source: str, files: dict[str, list[bytes]]) -> str:
    """A snapshot of `source` whose files are made of these chunks (stored or not: that is the caller's
    business), linked into the source's chain; returns its id."""
    records = repo.snapshots()
    head = repo.chain_head(source)
    serial = repo.next_serial(source, records)
    rows = []
    for i, (path, chunks) in enumerate(sorted(files.items())):
        data = b"".join(chunks)
        rows.append({"path": path, "raw_path": None, "type": "file", "size": len(data), "mode": 0o100644,
                     "uid": 0, "gid": 0, "mtime_ns": 0, "ctime_ns": 0, "inode": i + 1, "dev": 1, "nlink": 1,
                     "link_target": None, "content_hash": blake3.blake3(data, key=repo.master.file_hash_key).digest(),
                     "chunks": [repo.chunk_id(c) for c in chunks], "status": "new", "error": None})
    data = manifest.to_parquet(pa.Table.from_pylist(rows, schema=manifest.FILES_SCHEMA))
    name = manifest.content_named(manifest.files_name(source, serial), data)
    digest = repo.write_object(name, data)
    now = utc_now()
    return repo.commit(SnapshotRecord(source=source, serial=serial, started=now, finished=now, host="test",
                                      parent=None, previous=head[0] if head else None, manifests={name: digest}))


def forget(repo: Repository, rid: str) -> None:
    """What `vaultflow forget` does to one snapshot: a tombstone in its chain, then the record goes."""
    record = repo.snapshot(rid)
    repo.snapshots()
    head = repo.chain_head(record.source)
    assert head is not None
    repo.commit(retention.tombstone(record.source, repo.next_serial(record.source), head[0], retention.Policy(last=1),
                                    [(rid, record)], [], "test"))
    try:
        repo.backend.delete(f"snapshots/{rid}")
    except ObjectLocked:  # retained by S3 Object Lock: forgotten all the same (the tombstone names it)
        pass


def blobs(n: int, size: int = 40_000) -> list[bytes]:
    return [os.urandom(size) for _ in range(n)]


def assert_check_passes(repo: Repository, read_data: bool = True) -> list[str]:
    """`vaultflow check --read-data` in storage terms: no problem (notices allowed); returns the notices."""
    checker = Checker(reopen(repo))
    report = checker.structure()
    if read_data:
        checker.read_packs(checker.select_packs(None))
    assert report.ok, [f"{p.object}: {p.message}" for p in report.problems]
    return [f"{n.object}: {n.message}" for n in report.notices]


def assert_restores(repo: Repository, expected: dict[str, dict[str, list[bytes]]]) -> None:
    """Every live snapshot is exactly one of `expected` (id → files) and restores byte for byte, read by a fresh
    client whose index comes from storage."""
    client = reopen(repo)
    live = client.snapshots()
    assert set(live) == set(expected)
    for rid, files in expected.items():
        table = client.files_table(live[rid])
        got = {path: b"".join(client.load_blob(c) for c in chunks)
               for path, chunks in zip(table["path"].to_pylist(), table["chunks"].to_pylist(), strict=True)}
        assert got == {path: b"".join(chunks) for path, chunks in files.items()}, rid


def objects(repo: Repository) -> dict[str, str]:
    """Every object and a hash of its bytes (locks aside: a dry run holds one while it runs)."""
    return {name: blake3.blake3(repo.backend.read(name)).hexdigest() for name, _ in repo.backend.list("")
            if not name.startswith("locks/")}


def commit_ids(repo: Repository, source: str, files: list[list[bytes]]) -> str:
    """A snapshot whose files reference these chunk ids (none of them stored): enough for the mark phase."""
    records = repo.snapshots()
    head = repo.chain_head(source)
    serial = repo.next_serial(source, records)
    n = len(files)
    table = pa.table({"path": [f"f{i:07d}" for i in range(n)], "raw_path": pa.nulls(n, pa.binary()),
                      "type": ["file"] * n, "size": [0] * n, "mode": [0o100644] * n, "uid": [0] * n, "gid": [0] * n,
                      "mtime_ns": [0] * n, "ctime_ns": [0] * n, "inode": list(range(n)), "dev": [1] * n,
                      "nlink": [1] * n, "link_target": pa.nulls(n, pa.binary()), "content_hash": [b"\0" * 32] * n,
                      "chunks": files, "status": ["new"] * n, "error": pa.nulls(n, pa.string())},
                     schema=manifest.FILES_SCHEMA)
    data = manifest.to_parquet(table)
    name = manifest.content_named(manifest.files_name(source, serial), data)
    digest = repo.write_object(name, data)
    now = utc_now()
    return repo.commit(SnapshotRecord(source=source, serial=serial, started=now, finished=now, host="test",
                                      parent=None, previous=head[0] if head else None, manifests={name: digest}))


def with_one_forgotten_pack(repo: Repository) -> tuple[str, dict[str, dict[str, list[bytes]]]]:
    """A pack only a forgotten snapshot used, and one live snapshot (id → files) in another pack."""
    old, kept = blobs(1), blobs(1)
    p_old = store(repo, old)
    forget(repo, commit(repo, "home", {"old": old}))
    store(repo, kept)
    return p_old, {commit(repo, "home", {"k": kept}): {"k": kept}}
