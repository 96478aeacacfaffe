"""Prune: two phases with a grace period, never losing what a snapshot references — with a client that held a
stale index, after a SIGKILL at any step, on local disks and S3 — and a mark phase whose memory does not grow
with the number of snapshots."""

from __future__ import annotations

import os
import subprocess
import sys
import tracemalloc

import pyarrow as pa
import pytest
from conftest import FAST_KDF
from prune_helpers import (
    DAY,
    assert_check_passes,
    assert_restores,
    blobs,
    commit,
    commit_ids,
    forget,
    local,
    new_repo,
    objects,
    packs,
    reopen,
    store,
    with_one_forgotten_pack,
)

from vaultflow.storage import maintenance, prune
from vaultflow.storage.prune import KILL_AT, KILL_POINTS, PruneRefused
from vaultflow.storage.repository import Repository

T0 = 1_800_000_000.0  # the fake clock's start (2027-01-15)


def test_unused_packs_become_candidates_and_go_only_after_the_grace_period(location):
    repo = new_repo(location)
    old, kept = blobs(1), blobs(2)
    p_old = store(repo, old)
    s_old = commit(repo, "home", {"old": old})
    p_kept = store(repo, kept)
    s_kept = commit(repo, "home", {"a": [kept[0]], "b": [kept[1]]})
    forget(repo, s_old)

    first = prune.prune(repo, now=T0)
    assert first.mark == [p_old] and first.keep == [p_kept] and not first.delete
    assert packs(repo) == {p_old, p_kept}  # phase 1 deletes nothing
    assert p_old not in reopen(repo).index.pack_set()  # but no reader or writer sees it any more
    assert maintenance.deletion_candidates(repo) == {p_old: maintenance.iso(T0)}
    notices = assert_check_passes(repo)
    assert notices == [f"{p_old}: deletion candidate since {maintenance.iso(T0)}: a later prune deletes it after "
                       "the grace period unless a snapshot uses it again"]
    assert reopen(repo).write_session().adopt_orphan_packs() == 0  # a backup does not take it back

    within = prune.prune(repo, now=T0 + DAY - 60)
    assert within.pending == [p_old] and not within.delete and packs(repo) == {p_old, p_kept}

    after = prune.prune(repo, now=T0 + DAY)
    assert after.delete == [p_old] and after.summary()["bytes_freed"] == after.packs[p_old].size
    assert packs(repo) == {p_kept} and maintenance.deletion_candidates(repo) == {}
    assert not list(repo.backend.list("maintenance"))  # the candidates object goes once it lists nothing
    assert assert_check_passes(repo) == []
    assert_restores(repo, {s_kept: {"a": [kept[0]], "b": [kept[1]]}})


def test_a_chunk_a_stale_client_referenced_keeps_its_candidate_pack_through_every_cycle(location):
    """kopia's maintenance safety test, with a fake clock: client A loaded the index before prune made the pack
    holding chunk x a candidate, then commits a snapshot referencing x; prune past the grace period marks again,
    finds x used, indexes the pack again and keeps it; every snapshot restores at every step."""
    repo = new_repo(location)
    x, other = blobs(1), blobs(1)
    p_x = store(repo, x)
    forget(repo, commit(repo, "home", {"x": x}))
    store(repo, other)
    s_other = commit(repo, "home", {"other": other})
    expected = {s_other: {"other": other}}

    client_a = reopen(repo)
    assert client_a.index.lookup(repo.chunk_id(x[0]))[0] == p_x  # A's backup has loaded the index
    now = T0
    assert prune.prune(repo, now=now).mark == [p_x]

    session = client_a.write_session()
    assert session.claim([repo.chunk_id(x[0])]) == [False]  # A deduplicates against its stale index
    session.close()
    s_a = commit(client_a, "laptop", {"x-again": x})
    expected[s_a] = {"x-again": x}

    for cycle in range(4):
        now += DAY + 1
        p = prune.prune(repo, now=now)
        assert p_x not in p.delete and p_x in packs(repo)
        assert p.reindex == ([p_x] if cycle == 0 else []) and (cycle == 0 or p_x in p.keep)
        assert p_x in reopen(repo).index.pack_set() and p_x not in maintenance.deletion_candidates(repo)
        assert assert_check_passes(repo) == []
        assert_restores(repo, expected)

    forget(repo, s_a)  # now nothing uses x: two more cycles free it
    del expected[s_a]
    assert prune.prune(repo, now=now + 1).mark == [p_x]
    assert prune.prune(repo, now=now + 2 * DAY).delete == [p_x] and p_x not in packs(repo)
    assert_check_passes(repo)
    assert_restores(repo, expected)


def test_partly_used_packs_are_repacked_while_unused_data_exceeds_max_unused(tmp_path):
    repo = local(tmp_path)
    chunks = blobs(20)
    p_mixed = store(repo, chunks)
    forget(repo, commit(repo, "home", {"gone": chunks[:1]}))
    s_rest = commit(repo, "home", {f"f{i}": [c] for i, c in enumerate(chunks[1:])})
    expected = {s_rest: {f"f{i}": [c] for i, c in enumerate(chunks[1:])}}
    # 1 of 20 equal blobs unused: 5.3 % of the used bytes, so 10% tolerates it, 1% and 0% do not (restic's rule)
    assert prune.plan(repo, now=T0, max_unused="10%").repack == []
    assert prune.plan(repo, now=T0, max_unused="unlimited").repack == []
    assert prune.plan(repo, now=T0, max_unused="1M").repack == []
    assert prune.plan(repo, now=T0, max_unused="1%").repack == [p_mixed]

    done = prune.prune(repo, now=T0, max_unused="0%")
    assert done.repack == [p_mixed] and done.summary()["bytes_copied"] == done.packs[p_mixed].used_bytes
    [p_new] = packs(repo) - {p_mixed}
    index = reopen(repo).index
    assert {index.lookup(repo.chunk_id(c))[0] for c in chunks[1:]} == {p_new}  # the copies are the indexed ones
    assert repo.chunk_id(chunks[0]) not in index
    assert_check_passes(repo)
    assert_restores(repo, expected)
    assert prune.prune(repo, now=T0 + DAY, max_unused="0%").delete == [p_mixed]
    assert packs(repo) == {p_new}
    assert_restores(repo, expected)


def test_a_dry_run_changes_no_object(location):
    repo = new_repo(location)
    gone, mixed = blobs(2), blobs(3)
    p_gone = store(repo, gone)
    forget(repo, commit(repo, "home", {"gone": gone}))
    prune.prune(repo, now=T0)  # p_gone is a candidate, due for deletion at T0 + 1 day
    p_mixed = store(repo, mixed)
    forget(repo, commit(repo, "home", {"m": mixed[:2]}))
    commit(repo, "home", {"kept": mixed[2:]})
    before = objects(repo)
    dry = prune.prune(repo, now=T0 + DAY, dry_run=True)
    assert dry.delete == [p_gone] and dry.repack == [p_mixed]
    assert dry.summary()["bytes_freed"] == dry.packs[p_gone].size and dry.summary()["bytes_marked"] > 0
    assert objects(repo) == before


SCRIPT = ("import sys; from vaultflow.storage.repository import Repository; from vaultflow.storage import prune; "
          "prune.prune(Repository.open(sys.argv[1], 'pw'), now=float(sys.argv[2]))")


@pytest.mark.parametrize("point", KILL_POINTS)
def test_prune_killed_at_any_step_leaves_a_valid_repository_and_a_rerun_completes(tmp_path, point):
    repo = local(tmp_path)
    old1, old2 = blobs(1), blobs(1)
    store(repo, old1)
    store(repo, old2)
    forget(repo, commit(repo, "home", {"o1": old1, "o2": old2}))
    prune.prune(repo, now=T0)  # two candidates, due at T0 + 1 day: the killed run deletes them
    mixed, gone, kept = blobs(4), blobs(1), blobs(1)
    store(repo, mixed)
    store(repo, gone)
    store(repo, kept)
    forget(repo, commit(repo, "home", {"g": gone, "m": mixed[:3]}))
    s_live = commit(repo, "home", {"k": kept, "m": mixed[3:]})
    expected = {s_live: {"k": kept, "m": mixed[3:]}}

    killed = subprocess.run([sys.executable, "-c", SCRIPT, repo.url, str(T0 + DAY)], capture_output=True,
                            text=True, timeout=300, env={**os.environ, KILL_AT: point})
    assert killed.returncode == -9, killed.stderr  # it really died there
    assert_check_passes(repo)
    assert_restores(repo, expected)

    rerun = prune.prune(repo, now=T0 + DAY + 60)
    assert_check_passes(repo)
    assert_restores(repo, expected)
    assert not maintenance.load(repo)[2]  # no damaged candidates object either
    prune.prune(repo, now=T0 + 3 * DAY)  # everything marked by either run is past its grace period now
    final = prune.plan(repo, now=T0 + 3 * DAY, max_unused="0%")
    assert final.keep == sorted(packs(repo)) and not (final.mark or final.pending or final.repack), rerun.summary()
    assert_restores(repo, expected)


def test_mark_memory_grows_with_distinct_chunks_not_with_snapshots(tmp_path):
    repo = local(tmp_path)
    tree = [[os.urandom(32) for _ in range(4)] for _ in range(10_000)]  # 40,000 distinct chunks, 1.28 MB of ids

    def peak(snapshots: int) -> int:
        while len(repo.snapshots()) < snapshots:
            commit_ids(repo, "tree", tree)
        before = pa.total_allocated_bytes()
        tracemalloc.start()
        used = prune.mark(repo)
        size = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert len(used) == 40_000 and pa.total_allocated_bytes() - before < 1 << 20  # no Arrow table kept
        return size

    few, many = peak(10), peak(40)
    assert few >= 40_000 * 32  # the used set itself is measured
    assert many < 1.5 * few, (few, many)  # flat in the number of snapshots (about 5.4 MB both)
    assert many < 40 * 40_000 * 32 / 4, many  # holding every snapshot's ids at once would take 51 MB


def test_prune_refuses_what_it_cannot_judge_and_changes_nothing(tmp_path):
    repo = local(tmp_path)
    data, gone = blobs(1), blobs(1)
    p_data = store(repo, data)
    forget(repo, commit(repo, "home", {"gone": gone}))
    commit(repo, "home", {"d": data})
    before = objects(repo)

    junk = b"not an index file"
    repo.backend.write(f"index/{'0' * 64}", junk)
    with pytest.raises(PruneRefused, match="repair index"):
        prune.prune(repo, now=T0)
    repo.backend.delete(f"index/{'0' * 64}")

    repo.backend.write(f"snapshots/{'1' * 64}", b'{"record": {}, "mac": "00"}\n')
    with pytest.raises(PruneRefused, match="repair snapshots"):
        prune.prune(repo, now=T0)
    repo.backend.delete(f"snapshots/{'1' * 64}")

    content = repo.backend.read(p_data)
    repo.backend.delete(p_data)  # a pack a snapshot needs is lost
    with pytest.raises(PruneRefused, match="1 chunks that snapshots reference are in no pack"):
        prune.prune(repo, now=T0)
    repo.backend.write(p_data, content)
    assert objects(repo) == before
    assert prune.prune(repo, now=T0).summary()["packs_kept"] == 1


def test_a_lost_pack_no_snapshot_needs_is_forgotten_from_the_index(tmp_path):
    repo = local(tmp_path)
    old, kept = blobs(1), blobs(1)
    p_old = store(repo, old)
    forget(repo, commit(repo, "home", {"old": old}))
    store(repo, kept)
    s_kept = commit(repo, "home", {"k": kept})
    repo.backend.delete(p_old)
    assert prune.prune(repo, now=T0).summary()["packs_lost_forgotten"] == 1
    assert assert_check_passes(repo) == []  # check no longer reports a missing pack nothing needed
    assert_restores(repo, {s_kept: {"k": kept}})


def test_the_candidates_object_is_authenticated(tmp_path):
    repo = local(tmp_path)
    old = blobs(1)
    p_old = store(repo, old)
    forget(repo, commit(repo, "home", {"old": old}))
    prune.prune(repo, now=T0)
    [name] = [n for n, _ in repo.backend.list("maintenance")]
    forged = repo.backend.read(name).replace(maintenance.iso(T0).encode(), maintenance.iso(T0 - 9 * DAY).encode())
    repo.backend.delete(name)
    from vaultflow.storage.crypto import content_hash

    repo.backend.write(f"{maintenance.CANDIDATES}{content_hash(forged)}", forged)
    found, _, damaged = maintenance.load(repo)
    assert found == {} and list(damaged) == [f"{maintenance.CANDIDATES}{content_hash(forged)}"]
    assert "does not authenticate" in next(iter(damaged.values()))
    # an earlier time cannot be forged: the pack is a plain leftover again, and prune restarts its clock
    again = prune.prune(repo, now=T0 + DAY)
    assert again.mark == [p_old] and not again.delete
    assert maintenance.deletion_candidates(repo) == {p_old: maintenance.iso(T0 + DAY)}


def test_under_s3_object_lock_refused_deletes_are_pending_not_errors(s3_server):
    import boto3

    bucket = f"vf-lock-{os.urandom(5).hex()}"
    boto3.client("s3", endpoint_url=s3_server.endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                 region_name="us-east-1").create_bucket(Bucket=bucket, ObjectLockEnabledForBucket=True)
    url = f"s3://{bucket}/repo"
    repo = Repository.init(url, "pw", storage_options=s3_server.storage_options, kdf=FAST_KDF,
                           object_lock=("compliance", 1))
    p_old, expected = with_one_forgotten_pack(repo)
    first = prune.prune(repo, now=T0)  # the index file listing p_old is retained: it cannot go yet
    assert first.mark == [p_old] and first.retained == first.removed_index_files != []
    assert_check_passes(repo)
    again = prune.prune(repo, now=T0 + DAY)  # still listed there: marked again, its clock restarts; no error
    assert again.mark == [p_old] and not again.delete and p_old in packs(repo)
    assert_restores(repo, expected)
