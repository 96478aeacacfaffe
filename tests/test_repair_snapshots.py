"""`repair snapshots` quarantines damaged records and records it in the chain, so check is clean again and every
source goes on (issue 14, defect 2)."""

from __future__ import annotations

from test_record_isolation import commit, flip, make, reopen

from vaultflow import __version__
from vaultflow.storage.checker import Checker
from vaultflow.storage.retention import quarantine_damaged


def test_a_damaged_older_record_is_quarantined_with_a_tombstone_and_check_passes(location):
    repo = make(location)
    a1 = commit(repo, "a", 1, None)
    a2 = commit(repo, "a", 2, a1)
    a3 = commit(repo, "a", 3, a2)
    commit(repo, "b", 1, None)
    original = repo.backend.read(f"snapshots/{a2}")
    flip(repo, a2, 40)
    before = Checker(reopen(location)).structure()
    assert [p.kind for p in before.problems] == ["snapshot", "chain"]  # damaged, and a3's link dangles

    [q] = quarantine_damaged(reopen(location), __version__)
    assert (q.id, q.source, q.serial) == (a2, "a", 2) and q.tombstone  # serial from a3's authenticated link
    repo = reopen(location)
    assert repo.backend.read(f"quarantine/snapshots/{a2}") != original  # the damaged bytes, kept as found
    assert not repo.backend.exists(f"snapshots/{a2}")
    after = Checker(repo).structure()
    assert after.problems == [] and [n.kind for n in after.notices] == ["quarantined"]
    repo.snapshots()
    tomb = repo.chain_records[q.tombstone]
    assert (tomb.serial, tomb.previous, tomb.tombstone["reason"]) == (4, a3, "quarantine")
    assert sorted(r.serial for r in repo.snapshots().values() if r.source == "a") == [1, 3]
    assert repo.next_serial("a") == 5 and quarantine_damaged(repo, __version__) == []  # a re-run: nothing left


def test_a_damaged_newest_record_is_placed_by_what_it_claims_and_its_serial_is_never_reused(location):
    repo = make(location)
    b1 = commit(repo, "b", 1, None)
    b2 = commit(repo, "b", 2, b1)
    flip(repo, b2, 100)  # inside the MAC: the JSON still says source b, serial 2
    [q] = quarantine_damaged(reopen(location), __version__)
    assert (q.source, q.serial) == ("b", 2)
    repo = reopen(location)
    assert Checker(repo).structure().problems == []
    repo.snapshots()
    assert repo.chain_records[q.tombstone].serial == 3 and repo.next_serial("b") == 4
    assert repo.chain_head("b")[0] == q.tombstone  # what the next backup of b links to


def test_a_repair_stopped_after_its_tombstone_is_finished_by_the_next(location):
    repo = make(location)
    c1 = commit(repo, "c", 1, None)
    c2 = commit(repo, "c", 2, c1)
    commit(repo, "c", 3, c2)
    flip(repo, c2, 40)
    data = repo.backend.read(f"snapshots/{c2}")
    [q] = quarantine_damaged(reopen(location), __version__)
    repo = reopen(location)
    repo.backend.write(f"snapshots/{c2}", data)  # as if the delete had not happened (killed before it)
    [again] = quarantine_damaged(reopen(location), __version__)
    assert again.tombstone == q.tombstone  # no second tombstone
    repo = reopen(location)
    assert not repo.backend.exists(f"snapshots/{c2}") and Checker(repo).structure().problems == []
