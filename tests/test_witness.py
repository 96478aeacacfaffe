"""Head witnesses: deleting a source's newest records (a rollback) or reusing a serial (a fork) is caught by
`check` through this machine's high-water mark and through the Prefect API's record of each commit."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import time
from pathlib import Path

import pytest
from conftest import FAST_KDF

from vaultflow.storage.errors import IntegrityError, RepositoryLocked
from vaultflow.storage.repository import Repository
from vaultflow.storage.snapshot import SnapshotRecord
from vaultflow.storage.witness import Head, LocalWitness, compare

REPO_ID = "ab" * 16


def record(source: str, serial: int) -> SnapshotRecord:
    return SnapshotRecord(source=source, serial=serial, started="2026-01-01T00:00:00.000000Z",
                          finished="2026-01-01T00:00:01.000000Z", host="h", parent=None, previous=None, manifests={})


# -- the local high-water mark, without Prefect ------------------------------------------------------------


def test_local_witness_only_moves_forward_and_keeps_fork_alarms(tmp_path):
    w = LocalWitness(tmp_path, REPO_ID)
    assert w.advance({"tree": Head(2, "b" * 64)}, by="backup") == []
    assert w.advance({"tree": Head(1, "a" * 64)}, by="check") == []  # an older head never replaces a newer one
    assert w.load().sources["tree"].serial == 2 and w.load().sources["tree"].id == "b" * 64
    [fork] = w.advance({"tree": Head(2, "c" * 64)}, by="backup")  # serial 2 again, another record: a fork
    assert fork.kind == "fork" and "serial 2" in fork.message and "bbbbbbbbbbbb" in fork.message
    assert w.load().sources["tree"].id == "b" * 64  # the first id is kept
    w.advance({"tree": Head(3, "d" * 64)}, by="backup")  # history moves on …
    state = w.load()
    assert state.sources["tree"].serial == 3
    # … but the alarm stays until a person removes it
    assert [(f.kind, f.serial) for f in w.findings({"d" * 64: record("tree", 3)}, state)] == [("fork", 2)]


def test_compare_reports_rollbacks_and_forks_but_not_retention(tmp_path):
    w = LocalWitness(tmp_path, REPO_ID)
    w.advance({"tree": Head(3, "c" * 64), "db": Head(1, "e" * 64), "gone": Head(4, "f" * 64)}, by="backup")
    records = {"a" * 64: record("tree", 2), "9" * 64: record("db", 1)}
    found = {(f.kind, f.source): f for f in w.findings(records)}
    assert set(found) == {("rollback", "tree"), ("fork", "db"), ("rollback", "gone")}
    assert found["rollback", "tree"].message.startswith(
        "source 'tree': rollback: serial 3 (recorded by this machine's witness at ")
    assert "is missing; the newest record in the repository is serial 2" in found["rollback", "tree"].message
    assert "holds no record of this source" in found["rollback", "gone"].message
    # serial 1 of 'tree' was forgotten (retention): below the head, absent, and not a finding
    assert compare({"c" * 64: record("tree", 3)}, w.sightings(w.load())[-1:]) == []


def test_damaged_witness_file_is_named(tmp_path):
    w = LocalWitness(tmp_path, REPO_ID)
    w.advance({"tree": Head(1, "a" * 64)}, by="backup")
    w.path.write_text('{"vaultflow_witness": 1, "repository": "x"')
    with pytest.raises(IntegrityError, match=str(w.path)):
        w.load()


def _advance_many(folder: str, serials: list[int]) -> None:
    w = LocalWitness(folder, REPO_ID)
    for s in serials:
        w.advance({"tree": Head(s, f"{s:064x}"), f"s{s % 3}": Head(s, f"{s:064x}")}, by="backup")


def test_concurrent_updaters_never_lose_the_highest_head(tmp_path):
    """Processes race read-modify-write on one file; without the flock a lower head overwrites a higher one."""
    serials = list(range(1, 241))
    random.Random(7).shuffle(serials)
    ctx = multiprocessing.get_context("spawn")  # fork in a process with Prefect's threads can deadlock
    procs = [ctx.Process(target=_advance_many, args=(str(tmp_path), serials[i::6])) for i in range(6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(180)
    assert all(p.exitcode == 0 for p in procs)
    state = LocalWitness(tmp_path, REPO_ID).load()
    assert state.sources["tree"] == Head(240, f"{240:064x}", state.sources["tree"].seen, "backup")
    assert {k: v.serial for k, v in state.sources.items() if k != "tree"} == {"s0": 240, "s1": 238, "s2": 239}
    assert state.forks == [] and not list(tmp_path.glob("*.tmp"))


# -- the check flow against a real Prefect server ----------------------------------------------------------


@pytest.fixture
def two_backups(location, prefect_server, monkeypatch, tmp_path):
    """A repository with two snapshots of source 'tree', backed up by flow runs with their own vaultflow home."""
    monkeypatch.setenv("VAULTFLOW_PASSWORD", "pw")
    monkeypatch.setenv("VAULTFLOW_STORAGE_OPTIONS", json.dumps(location.storage_options))
    monkeypatch.setenv("VAULTFLOW_HOME", str(tmp_path / "home"))
    Repository.init(location.url, "pw", storage_options=location.storage_options, kdf=FAST_KDF)
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.bin").write_bytes(os.urandom(50_000))
    backup(location.url, src)
    time.sleep(0.01)
    (src / "b.txt").write_text("second snapshot\n")
    backup(location.url, src)
    return Repository.open(location.url, "pw", storage_options=location.storage_options), src


def backup(url: str, src: Path) -> None:
    from vaultflow.flows.backup import backup as backup_flow
    from vaultflow.flows.runtime import run_flow

    run_flow(backup_flow, paths=[str(src)], source="tree", repository=url)


def check(url: str):  # type: ignore[no-untyped-def]
    """The check flow's report; a failed check returns the report it raised with."""
    from vaultflow.flows.check import CheckFailed, check
    from vaultflow.flows.runtime import run_flow

    try:
        return run_flow(check, repository=url)
    except CheckFailed as e:
        return e.report


def test_clean_repository_passes_with_both_witnesses_consulted(two_backups):
    repo, _ = two_backups
    report = check(repo.url)
    assert report["ok"] and report["problems"] == []
    local, api = report["witnesses"]
    assert "this machine's witness" in local and "(1 sources)" in local
    assert api == "the Prefect API (2 recorded commits)"


def test_deleted_newest_record_is_a_rollback_to_both_witnesses(two_backups, tmp_path, monkeypatch):
    repo, _ = two_backups
    second, _ = repo.find_snapshot("tree:2")
    repo.backend.delete(f"snapshots/{second}")
    report = check(repo.url)
    rollbacks = [p["message"] for p in report["problems"] if p["kind"] == "rollback"]
    assert len(rollbacks) == 2 and not any(p["kind"] == "fork" for p in report["problems"]), report["problems"]
    assert all("rollback: serial 2 (" in m and "the newest record in the repository is serial 1" in m
               for m in rollbacks)
    assert any("recorded by this machine's witness at" in m for m in rollbacks)
    assert any("committed by flow run" in m for m in rollbacks)

    # This machine's witness gone (another machine, a wiped home): the Prefect API still remembers serial 2.
    monkeypatch.setenv("VAULTFLOW_HOME", str(tmp_path / "fresh-home"))
    report = check(repo.url)
    [only] = [p for p in report["problems"] if p["kind"] in ("rollback", "fork")]
    assert only["kind"] == "rollback" and only["object"] == "source 'tree'"
    assert "source 'tree': rollback: serial 2 (committed by flow run " in only["message"]
    assert "is missing; the newest record in the repository is serial 1" in only["message"]
    assert "(0 sources)" in report["witnesses"][0]


def test_after_a_rollback_this_machine_never_reuses_the_serial(two_backups):
    """The local witness keeps the next backup above the rolled-back head: a gap that check reports, no fork."""
    repo, src = two_backups
    second, _ = repo.find_snapshot("tree:2")
    repo.backend.delete(f"snapshots/{second}")
    backup(repo.url, src)
    assert sorted(r.serial for r in repo.snapshots().values()) == [1, 3]
    report = check(repo.url)
    assert not any(p["kind"] == "fork" for p in report["problems"]), report["problems"]
    assert any(p["kind"] == "chain" and "gap" in p["message"] for p in report["problems"]), report["problems"]


def test_reused_serial_after_a_rollback_is_a_fork_and_stays_one(two_backups, tmp_path, monkeypatch):
    """Another machine (no local witness) reuses serial 2; the Prefect API's record of the commit says fork."""
    repo, src = two_backups
    second, _ = repo.find_snapshot("tree:2")
    repo.backend.delete(f"snapshots/{second}")
    monkeypatch.setenv("VAULTFLOW_HOME", str(tmp_path / "another-machine"))
    backup(repo.url, src)  # the next backup reuses serial 2: the repository alone looks clean again
    report = check(repo.url)
    forks = [p["message"] for p in report["problems"] if p["kind"] == "fork"]
    assert len(forks) == 1 and not any(p["kind"] == "rollback" for p in report["problems"]), report["problems"]
    assert second[:12] in forks[0] and "committed by flow run" in forks[0]
    (src / "c.txt").write_text("third\n")
    backup(repo.url, src)  # serial 3: the witnesses move on, the fork stays reported
    later = check(repo.url)
    assert len([p for p in later["problems"] if p["kind"] == "fork"]) == 1, later["problems"]


def test_check_holds_a_shared_lock_so_prune_excludes_it(two_backups):
    repo, _ = two_backups
    with repo.lock(exclusive=True, purpose="prune"), pytest.raises(RepositoryLocked, match="prune"):
        check(repo.url)


def test_unreachable_prefect_api_is_reported_as_not_consulted_not_as_a_failure(tmp_path, monkeypatch):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from vaultflow.tasks.witness import consult, local_witness

    monkeypatch.setenv("VAULTFLOW_HOME", str(tmp_path))
    local_witness(REPO_ID).advance({"tree": Head(2, "b" * 64)}, by="backup")
    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:1/api"}):  # nothing listens on port 1
        found = consult(REPO_ID, {"a" * 64: record("tree", 1)})
    assert [p.kind for p in found.problems] == ["rollback"]  # this machine's witness still speaks
    assert found.witnesses[1].startswith("the Prefect API: not reachable")
