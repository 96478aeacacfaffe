"""forget: restic's keep rules over each source's chain, a tombstone per removal, and check that tells a policy's
removal from a deleted record."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime

import pytest
from backup_helpers import read_back
from conftest import FAST_KDF

from vaultflow.storage.checker import Checker
from vaultflow.storage.errors import VaultflowError
from vaultflow.storage.repository import Repository
from vaultflow.storage.retention import Policy, decide, effective_times
from vaultflow.storage.snapshot import SnapshotRecord

NOW = datetime(2026, 11, 25, 12, tzinfo=UTC)


def chain(*starts: str) -> list[tuple[str, SnapshotRecord]]:
    out, prev = [], None
    for serial, started in enumerate(starts, 1):
        rid = f"{serial:064x}"
        out.append((rid, SnapshotRecord(source="s", serial=serial, started=started, finished=started, host="h",
                                        parent=None, previous=prev, manifests={})))
        prev = rid
    return out


def kept_serials(records: list[tuple[str, SnapshotRecord]], policy: Policy) -> list[int]:
    d = decide(records, policy, NOW)
    serial = {rid: r.serial for rid, r in records}
    return sorted(serial[rid] for rid in d.keep)


def test_keep_rules_follow_restic():
    days = chain(*[f"2026-11-{d:02d}T0{h}:00:00.000000Z" for d in range(1, 11) for h in (1, 5)])  # 20, 2 a day
    assert kept_serials(days, Policy(last=3)) == [18, 19, 20]
    assert kept_serials(days, Policy(daily=3)) == [16, 18, 20]  # the newest of each of the last 3 days
    assert kept_serials(days, Policy(hourly=3)) == [18, 19, 20]
    assert kept_serials(days, Policy(within="2d")) == [16, 17, 18, 19, 20]  # relative to the newest, not now
    # ISO weeks: Nov 1 is in week 44, Nov 2-8 in 45, Nov 9-10 in 46; the newest of each is kept
    assert kept_serials(days, Policy(weekly=2)) == [16, 20]
    assert kept_serials(days, Policy(weekly=5)) == [2, 16, 20]
    assert kept_serials(days, Policy(monthly=12)) == [20] and kept_serials(days, Policy(yearly=1)) == [20]


def test_the_newest_is_always_kept_and_tags_keep_theirs():
    records = chain("2026-01-01T00:00:00.000000Z", "2026-02-01T00:00:00.000000Z", "2026-03-01T00:00:00.000000Z")
    rid, first = records[0]
    records[0] = (rid, dataclasses.replace(first, tags=["gold"]))
    assert kept_serials(records, Policy(tags=("gold",))) == [1, 3]


def test_no_rule_is_refused_and_a_bad_duration_is_explained():
    with pytest.raises(VaultflowError, match="no keep rule"):
        decide(chain("2026-01-01T00:00:00.000000Z"), Policy(), NOW)
    with pytest.raises(VaultflowError, match="1y2m3d4h"):
        decide(chain("2026-01-01T00:00:00.000000Z"), Policy(within="3 days"), NOW)


def test_a_record_forged_with_an_old_timestamp_cannot_push_a_genuine_old_snapshot_out():
    # serial 1 is the genuine 2020 snapshot; serial 4 arrives after 2026's but claims to be the newest of 2020:
    # ordered by claimed time (restic) it would take 2020's yearly slot and serial 1 would be removed.
    records = chain("2020-06-01T00:00:00.000000Z", "2026-01-01T00:00:00.000000Z",
                    "2026-06-01T00:00:00.000000Z", "2020-12-31T00:00:00.000000Z")
    times = effective_times(sorted(records, key=lambda r: r[1].serial), NOW)
    assert times[records[3][0]] == datetime(2026, 6, 1, tzinfo=UTC)  # clamped to its predecessor's time
    assert kept_serials(records, Policy(yearly=2)) == [1, 4]
    future = chain("2026-01-01T00:00:00.000000Z", "2099-01-01T00:00:00.000000Z", "2026-02-01T00:00:00.000000Z")
    assert effective_times(future, NOW)[future[1][0]] == NOW  # not newer than now


@pytest.fixture
def repo_with_backups(prefect_server, monkeypatch, tmp_path):
    from vaultflow.flows.backup import backup
    from vaultflow.flows.runtime import run_flow

    monkeypatch.setenv("VAULTFLOW_PASSWORD", "pw")
    repo = Repository.init(str(tmp_path / "repo"), "pw", kdf=FAST_KDF)
    src = tmp_path / "src"
    src.mkdir()
    contents = []
    for i in range(4):
        (src / "f.txt").write_text(f"version {i}\n" * 1000)
        run_flow(backup, paths=[str(src)], source="docs", repository=repo.url)
        contents.append((src / "f.txt").read_bytes())
    return repo, src, contents


def test_forget_commits_a_tombstone_deletes_the_records_and_check_still_passes(repo_with_backups):
    from vaultflow.flows.backup import backup
    from vaultflow.flows.forget import forget
    from vaultflow.flows.runtime import run_flow

    repo, src, contents = repo_with_backups
    [dry] = run_flow(forget, keep_last=2, dry_run=True, repository=repo.url)
    assert [r["serial"] for r in dry.removed] == [2, 1] and dry.tombstone is None
    assert len(Repository.open(repo.url, "pw").snapshots()) == 4  # a dry run changes nothing

    [done] = run_flow(forget, keep_last=2, repository=repo.url)
    repo = Repository.open(repo.url, "pw")
    live = repo.snapshots()
    assert sorted(r.serial for r in live.values()) == [3, 4]
    tomb = repo.chain_records[done.tombstone]
    assert tomb.serial == 5 and tomb.tombstone["policy"] == "keep-last 2"
    assert sorted(tomb.removed().values()) == [1, 2] and not any(repo.backend.exists(f"snapshots/{rid}")
                                                                  for rid in tomb.removed())
    report = Checker(repo).structure()
    assert report.problems == [] and report.snapshots == 2
    assert read_back(repo, "docs:4")[b"f.txt"] == contents[3]

    run_flow(backup, paths=[str(src)], source="docs", repository=repo.url)  # links to the tombstone
    repo = Repository.open(repo.url, "pw")
    newest = repo.find_snapshot("docs:latest")[1]
    assert newest.serial == 6 and newest.previous == done.tombstone
    assert Checker(repo).structure().problems == []


def test_a_record_deleted_without_a_tombstone_is_still_a_gap(repo_with_backups):
    repo, _, _ = repo_with_backups
    rid = repo.find_snapshot("docs:2")[0]
    repo.backend.delete(f"snapshots/{rid}")
    problems = Checker(Repository.open(repo.url, "pw")).structure().problems
    assert any("gap" in p.message and "no forget recorded it" in p.message for p in problems)


def test_an_interrupted_forget_hides_its_records_and_the_next_forget_deletes_them(repo_with_backups):
    from vaultflow import __version__
    from vaultflow.flows.forget import forget
    from vaultflow.flows.runtime import run_flow
    from vaultflow.storage import retention

    repo, _, _ = repo_with_backups
    repo.snapshots()
    first = repo.find_snapshot("docs:1")
    head = repo.chain_head("docs")
    tomb = retention.tombstone("docs", 5, head[0], Policy(last=3), [first], [], __version__)
    repo.commit(tomb)  # the forget stopped here, before deleting serial 1
    repo = Repository.open(repo.url, "pw")
    assert sorted(r.serial for r in repo.snapshots().values()) == [2, 3, 4]
    report = Checker(repo).structure()
    assert report.problems == [] and [n.kind for n in report.notices] == ["forgotten"]
    [done] = run_flow(forget, keep_last=3, repository=repo.url)
    assert done.removed == [] and done.deleted == 1 and not repo.backend.exists(f"snapshots/{first[0]}")
    assert Checker(Repository.open(repo.url, "pw")).structure().notices == []


def test_a_tombstone_that_lies_about_what_it_removed_is_a_chain_problem(repo_with_backups):
    from vaultflow import __version__
    from vaultflow.storage import retention

    repo, _, _ = repo_with_backups
    repo.snapshots()
    rid, rec = repo.find_snapshot("docs:2")
    lie = retention.tombstone("docs", 5, repo.chain_head("docs")[0], Policy(last=1),
                              [(rid, dataclasses.replace(rec, serial=3))], [], __version__)
    repo.commit(lie)
    repo.backend.delete(f"snapshots/{rid}")
    problems = Checker(Repository.open(repo.url, "pw")).structure().problems
    assert any("broken chain" in p.message and "names its predecessor" in p.message for p in problems)
