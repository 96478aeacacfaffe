"""The commit is safe: no fork from a retried or a fenced commit, no committed object replaced, no reference to
a lost pack, `started` taken after the lock; every test runs the real backup flow against a real Prefect server."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import fsspec
import pytest
from backup_helpers import read_back
from conftest import FAST_KDF
from fsspec.implementations.memory import MemoryFileSystem

from vaultflow.storage.checker import Checker
from vaultflow.storage.errors import LockLost
from vaultflow.storage.repository import Repository
from vaultflow.storage.snapshot import parse_utc


@pytest.fixture
def repo(location, prefect_server, monkeypatch) -> Repository:
    monkeypatch.setenv("VAULTFLOW_PASSWORD", "pw")
    monkeypatch.setenv("VAULTFLOW_STORAGE_OPTIONS", json.dumps(location.storage_options))
    return Repository.init(location.url, "pw", storage_options=location.storage_options, kdf=FAST_KDF)


def backup(repo: Repository, paths: list[str], **kw: Any) -> Any:
    from vaultflow.flows.backup import backup as flow
    from vaultflow.flows.runtime import run_flow

    return run_flow(flow, paths=paths, repository=repo.url, **kw)


def fresh(repo: Repository) -> Repository:
    return Repository.open(repo.url, "pw", storage_options=repo.backend.fs.storage_options)


def records_of(repo: Repository, source: str) -> list[tuple[int, str]]:
    return sorted((r.serial, rid) for rid, r in fresh(repo).snapshots().items() if r.source == source)


def structure_problems(repo: Repository) -> list[str]:
    return [f"{p.object}: {p.message}" for p in Checker(fresh(repo)).structure().problems]


def tree(root: Path, n: int = 5, tag: str = "") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (root / f"f{i}.txt").write_text(f"{tag} file {i}\n" * (i + 1) * 500)
    return root


def test_a_retried_commit_that_had_written_its_record_forks_nothing(repo, tmp_path, monkeypatch):
    """The first attempt writes the record, then fails (a lost response): the retry must find its own record."""
    calls: list[str] = []
    real_commit = Repository.commit

    def commit_then_fail(self: Repository, record: Any) -> str:
        rid = real_commit(self, record)
        calls.append(rid)
        if len(calls) == 1:
            raise OSError("injected: connection reset after the record was stored")
        return rid

    monkeypatch.setattr(Repository, "commit", commit_then_fail)
    summary = backup(repo, [str(tree(tmp_path / "src"))], source="docs")
    assert len(calls) == 2 and calls[0] == calls[1]  # retried, and wrote the very same object
    assert records_of(repo, "docs") == [(1, summary.snapshot)]
    assert not structure_problems(repo)


class StallingFS(MemoryFileSystem):
    """A source filesystem whose file reads wait for the test: a backup paused between listing and commit."""

    protocol = "stallfs"
    store: dict[str, Any] = {}  # its own files, apart from memory://
    pseudo_dirs = [""]
    gate = threading.Event()
    entered = threading.Event()

    @classmethod
    def _strip_protocol(cls, path: str) -> str:
        return str(super()._strip_protocol(path.removeprefix("stallfs://")))

    def _open(self, path: str, mode: str = "rb", **kw: Any) -> Any:
        if "r" in mode:
            StallingFS.entered.set()
            StallingFS.gate.wait(60)
        return super()._open(path, mode, **kw)


def test_a_backup_that_lost_its_lock_commits_nothing_and_replaces_nothing(repo, tmp_path):
    """Backup A stalls; its lock is taken from it (judged stale); backup B of the same source commits serial 1.
    A must fail its fencing check: no second record of serial 1, B's manifest untouched."""
    fsspec.register_implementation("stallfs", StallingFS, clobber=True)
    StallingFS.store.clear()
    fs = StallingFS()
    for i in range(3):
        fs.pipe_file(f"/src/a{i}.txt", f"remote {i}\n".encode() * 1000)
    StallingFS.gate.clear()
    StallingFS.entered.clear()
    outcome: dict[str, BaseException | Any] = {}

    def run_a() -> None:
        try:
            outcome["a"] = backup(repo, ["stallfs://src"], source="shared")
        except BaseException as e:  # noqa: BLE001 - the test inspects it
            outcome["a"] = e

    a = threading.Thread(target=run_a)
    a.start()
    try:
        assert StallingFS.entered.wait(60)
        [(lock_name, _)] = list(repo.backend.list("locks"))
        repo.backend.delete(lock_name)  # another host judged A's lock stale and removed it
        b = backup(repo, [str(tree(tmp_path / "local"))], source="shared")
    finally:
        StallingFS.gate.set()
        a.join(120)
    assert isinstance(outcome["a"], LockLost), outcome["a"]
    assert records_of(repo, "shared") == [(1, b.snapshot)]
    assert not structure_problems(repo)  # B's manifest still hashes to what its record says
    assert set(read_back(fresh(repo), "shared:1")) == {f"f{i}.txt".encode() for i in range(5)}


def test_started_is_taken_after_waiting_for_the_lock(repo, tmp_path):
    src = str(tree(tmp_path / "src"))
    holder = repo.lock(purpose="backup of docs", scope="source:docs").acquire()
    released: list[float] = []

    def release_later() -> None:
        time.sleep(2.0)
        released.append(time.time())
        holder.release()

    t = threading.Thread(target=release_later)
    t.start()
    summary = backup(repo, [src], source="docs", lock_wait=60)
    t.join()
    record = fresh(repo).snapshot(summary.snapshot)
    assert parse_utc(record.started).timestamp() >= released[0]


def test_a_lost_pack_is_not_trusted_by_the_next_backup(repo, tmp_path):
    """Deleting a pack: the next backup stores those chunks again (re-reading unchanged files that used them),
    so the new snapshot restores completely; the old one is reported by check, not silently copied."""
    src = tree(tmp_path / "src", n=4)
    backup(repo, [str(src)], source="docs")
    [(pack, _)] = list(repo.backend.list("data"))
    repo.backend.delete(pack)
    summary = backup(repo, [str(src)], source="docs")  # nothing changed in the source
    assert summary.files_unchanged == 4 and summary.bytes_read > 0 and summary.packs_uploaded == 1
    assert read_back(fresh(repo), "docs:2") == {p.name.encode(): p.read_bytes() for p in src.iterdir()}
    problems = structure_problems(repo)
    assert any(pack in p for p in problems)  # the loss itself stays visible


def test_a_manifest_left_by_an_uncommitted_run_never_replaces_a_committed_one(repo, tmp_path):
    src = tree(tmp_path / "src")
    first = backup(repo, [str(src)], source="docs")
    record = fresh(repo).snapshot(first.snapshot)
    committed = {n: repo.backend.read(n) for n in record.manifests}
    from vaultflow.storage import manifest

    leftover = b"a run of serial 1 that never committed"  # e.g. it lost its lock after writing this
    name = manifest.content_named(manifest.files_name("docs", 1), leftover)
    repo.write_object(name, leftover)
    assert name not in committed
    second = backup(repo, [str(src)], source="docs")
    assert second.serial == 2
    for n, data in committed.items():
        assert repo.backend.read(n) == data
    assert not structure_problems(repo)


def test_restore_holds_a_shared_lock_so_repair_and_prune_exclude_it(repo, tmp_path):
    from vaultflow.flows.restore import restore
    from vaultflow.flows.runtime import run_flow
    from vaultflow.storage.errors import RepositoryLocked

    backup(repo, [str(tree(tmp_path / "src"))], source="docs")
    with repo.lock(exclusive=True, purpose="repair index"), pytest.raises(RepositoryLocked, match="repair index"):
        run_flow(restore, snapshot="docs:latest", target=str(tmp_path / "out"), repository=repo.url)
    summary = run_flow(restore, snapshot="docs:latest", target=str(tmp_path / "out2"), repository=repo.url)
    assert summary.files == 5 and not list(repo.backend.list("locks"))  # released afterwards


def test_a_damaged_newest_record_is_linked_over_never_reused(repo, tmp_path):
    src = tree(tmp_path / "src")
    backup(repo, [str(src)], source="docs")
    second = backup(repo, [str(src)], source="docs").snapshot
    name = f"snapshots/{second}"
    data = bytearray(repo.backend.read(name))
    data[40] ^= 1
    repo.backend.delete(name)
    repo.backend.write(name, bytes(data))
    third = backup(repo, [str(src)], source="docs")
    record = fresh(repo).snapshot(third.snapshot)
    assert (record.serial, record.previous) == (3, second)  # the chain names its real predecessor
    problems = structure_problems(repo)
    assert any(second in p and "snapshot record" in p for p in problems), problems
    assert not any("fork" in p for p in problems), problems


def test_a_damaged_index_file_stops_no_backup_and_the_backup_heals_it(repo, tmp_path):
    """One damaged index file used to fail every backup; its packs are read from their trailers, and the next
    backup's index file lists them again, so later readers no longer pay for the damage."""
    src = tree(tmp_path / "src", n=4)
    backup(repo, [str(src)], source="docs")
    [(index_file, _)] = list(repo.backend.list("index"))
    data = bytearray(repo.backend.read(index_file))
    data[60] ^= 1
    repo.backend.delete(index_file)
    repo.backend.write(index_file, bytes(data))
    (src / "new.txt").write_text("after the damage\n")
    summary = backup(repo, [str(src)], source="docs")
    assert summary.files_unchanged == 4 and summary.packs_uploaded == 1  # nothing stored twice
    again = fresh(repo)
    assert again.build_index() and again.damaged_index_files and not again.recovered_packs
    assert set(read_back(again, "docs:2")) == {p.name.encode() for p in src.iterdir()}
