"""A hypothesis state machine interleaves backups of several sources, a backup that loaded its index before a
prune and commits after it, forgets, prunes at moving clock times (and replications, see below), and after every
step proves that every snapshot still listed restores byte for byte and that check passes.

Quick in CI; VAULTFLOW_LONG_PROPERTY=1 runs many more examples."""

from __future__ import annotations

import os
import shutil
import tempfile

import hypothesis.strategies as st
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from prune_helpers import DAY, assert_check_passes, assert_restores, local, reopen

from vaultflow.storage import prune, replicate, retention
from vaultflow.storage.backend import Backend
from vaultflow.storage.pack import BlobType
from vaultflow.storage.repository import Repository

LONG = bool(os.environ.get("VAULTFLOW_LONG_PROPERTY"))
SOURCES = ("docs", "db")
# a pool of chunk contents, so snapshots share some data and dedup, prune and repack have work to do
POOL = [bytes([i]) * 3000 + os.urandom(16) for i in range(40)]


def write(repo: Repository, source: str, files: dict[str, list[int]],
          verify: bool = True) -> tuple[str, dict[str, list[bytes]]] | None:
    """A backup in storage terms: store the chunks this client's index does not know (dedup), then, like the real
    flow, rebuild the index from storage and refuse to commit if a referenced chunk is in no index file.
    `verify=False` is a writer without that check (an older or foreign client): only prune's grace period
    protects its references."""
    from prune_helpers import commit

    chunks = {path: [POOL[i] for i in ids] for path, ids in files.items()}
    session = repo.write_session()
    packer = session.packer()
    for data in {c for cs in chunks.values() for c in cs}:
        cid = repo.chunk_id(data)
        if session.claim([cid])[0]:
            packer.add(cid, BlobType.DATA, data)
    session.flush()
    session.write_index()
    session.close()
    fresh = repo.build_index()
    ids = [repo.chunk_id(c) for cs in chunks.values() for c in cs]
    if verify and not all(fresh.contains_many(ids)):
        return None  # the backup fails: "chunks referenced by the new manifest are in no index file"
    return commit(repo, source, chunks), chunks


class Lifecycle(RuleBasedStateMachine):
    @initialize()
    def start(self) -> None:
        self.folder = tempfile.mkdtemp(prefix="vf-lifecycle-")
        self.repo = local(_Tmp(self.folder))
        self.now = 1_900_000_000.0
        self.expected: dict[str, dict[str, list[bytes]]] = {}
        self.stale: tuple[Repository, str, dict[str, list[int]], float] | None = None
        self.ever: dict[str, dict[str, list[bytes]]] = {}  # every snapshot ever committed: a replica keeps them
        self.replicated: set[str] = set()

    def teardown(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    files = st.dictionaries(st.sampled_from(["a", "b", "c/d"]), st.lists(st.integers(0, len(POOL) - 1),
                                                                          min_size=0, max_size=4), min_size=1)

    @rule(source=st.sampled_from(SOURCES), files=files)
    def backup(self, source: str, files: dict[str, list[int]]) -> None:
        done = write(reopen(self.repo), source, files)
        assert done is not None  # a client with a fresh index never references what it cannot find
        self.expected[done[0]] = self.ever[done[0]] = done[1]

    @precondition(lambda self: self.stale is None and self.expected)
    @rule(source=st.sampled_from(SOURCES), data=st.data())
    def start_stale_backup(self, source: str, data: st.DataObject) -> None:
        """A backup that loads its index now and commits only after whatever comes next (a prune, say); its files
        are made of chunks some snapshot holds now (the content that dedups against what its index shows)."""
        held = sorted({POOL.index(c) for files in self.expected.values() for cs in files.values() for c in cs})
        if not held:
            return
        files = data.draw(st.dictionaries(st.sampled_from(["a", "b"]), st.lists(st.sampled_from(held), min_size=1,
                                                                                 max_size=3), min_size=1))
        client = reopen(self.repo)
        client.index  # noqa: B018 - loaded now, stale later
        self.stale = (client, source, files, self.now)

    @precondition(lambda self: self.stale is not None)
    @rule(verify=st.booleans())
    def finish_stale_backup(self, verify: bool) -> None:
        assert self.stale is not None
        client, source, files, started = self.stale
        self.stale = None
        client.snapshots()  # the chain as it is now: the serial and link come from storage, not from the start
        # Without the commit check, only a commit within the grace period is protected (docs/format.md §15)
        done = write(client, source, files, verify=verify or self.now - started >= DAY)
        if done is not None:
            self.expected[done[0]] = self.ever[done[0]] = done[1]

    @rule(source=st.sampled_from(SOURCES), keep=st.integers(1, 3))
    def forget(self, source: str, keep: int) -> None:
        repo = reopen(self.repo)
        live = [(rid, r) for rid, r in repo.snapshots().items() if r.source == source]
        if not live:
            return
        decision = retention.decide(live, retention.Policy(last=keep), retention.datetime.now(retention.UTC))
        if not decision.remove:
            return
        head = repo.chain_head(source)
        by_id = dict(live)
        repo.commit(retention.tombstone(source, repo.next_serial(source), head[0] if head else None,
                                        retention.Policy(last=keep), [(r, by_id[r]) for r in decision.remove],
                                        list(decision.keep), "test"))
        for rid in decision.remove:
            repo.backend.delete(f"snapshots/{rid}")
            del self.expected[rid]

    @rule(hours=st.sampled_from([0, 1, 30, 100]), max_unused=st.sampled_from(["0%", "5%", "unlimited"]))
    def prune(self, hours: int, max_unused: str) -> None:
        self.now += hours * 3600
        prune.prune(reopen(self.repo), now=self.now, grace=DAY, max_unused=max_unused)

    @rule()
    def replicate(self) -> None:
        """Copy to the replica (storage steps of flows/replicate.py): data first, then records in chain order."""
        source = reopen(self.repo)
        backend = Backend(os.path.join(self.folder, "replica"))
        replica, _ = replicate.open_replica(source, backend)
        replicate.sync_keys(source, replica.backend)
        plan = replicate.plan(source, replica.backend)
        for item in [*plan.packs, *plan.index_files, *plan.manifests]:
            replicate.copy_object(source, replica.backend, item)
        done = replicate.commit_records(source, replica, plan.records)
        assert not done.held, done.held  # everything the source lists is complete there
        self.replicated |= set(self.expected)

    @invariant()
    def every_listed_snapshot_restores_and_check_passes(self) -> None:
        if not hasattr(self, "repo"):
            return
        assert_restores(self.repo, self.expected)
        assert_check_passes(self.repo, read_data=False)
        if self.replicated:
            replica = Repository.open(os.path.join(self.folder, "replica"), "pw")
            live = replica.snapshots()
            assert self.replicated & set(self.expected) <= set(live)  # what was copied and is still listed
            for rid, rec in live.items():  # every snapshot the replica lists restores exactly, forgotten or not
                table = replica.files_table(rec)
                got = {p: b"".join(replica.load_blob(c) for c in cs)
                       for p, cs in zip(table["path"].to_pylist(), table["chunks"].to_pylist(), strict=True)}
                assert got == {p: b"".join(cs) for p, cs in self.ever[rid].items()}, rid
            assert_check_passes(replica, read_data=False)


class _Tmp:
    """What prune_helpers.local wants of pytest's tmp_path: a folder to put `repo` in."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def __truediv__(self, name: str) -> str:
        return os.path.join(self.folder, name)


Lifecycle.TestCase.settings = settings(max_examples=300 if LONG else 30, stateful_step_count=30 if LONG else 12,
                                       deadline=None, suppress_health_check=list(HealthCheck))
test_lifecycle = Lifecycle.TestCase


def test_a_stale_writer_that_commits_between_the_two_phases_keeps_its_data():
    """The interleaving the state machine is after, spelled out: a backup loads its index, its chunk's only
    snapshot is forgotten, prune makes the pack a candidate, the backup commits without the commit check, and
    prunes past the grace period must index that pack again instead of deleting it."""

    class Pick:
        def draw(self, _: object) -> dict[str, list[int]]:
            return {"a": [1]}

    m = Lifecycle()
    m.start()
    try:
        m.backup("docs", {"a": [1]})
        m.backup("docs", {"a": [2]})
        m.start_stale_backup("db", Pick())  # type: ignore[arg-type]
        for step in (lambda: m.forget("docs", 1), lambda: m.prune(0, "5%"), lambda: m.finish_stale_backup(False),
                     lambda: m.prune(30, "5%"), lambda: m.prune(30, "0%")):
            step()
            m.every_listed_snapshot_restores_and_check_passes()
        assert len(m.expected) == 2  # docs#2 and the stale writer's db#1, both restoring byte for byte
    finally:
        m.teardown()
