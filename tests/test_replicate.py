"""Replication: a replica shares the source's keys, receives every object byte for byte and verified, commits
records last in chain order, resumes after a kill without copying again, and reports its lag and lost data."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from backup_helpers import read_back
from conftest import FAST_KDF

from vaultflow.storage import replicate as repl
from vaultflow.storage.backend import Backend
from vaultflow.storage.checker import Checker, read_packs
from vaultflow.storage.errors import IntegrityError
from vaultflow.storage.repository import Repository
from vaultflow.storage.snapshot import SnapshotRecord, utc_now

# Runs `vaultflow` with the replicate command whether or not cli/cli.py has hooked it in yet.
LAUNCHER = """
import argparse, sys
from vaultflow import cli, replicate
build = cli.build_parser
def with_replicate():
    p = build()
    sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    if "replicate" not in sub.choices:
        common = argparse.ArgumentParser(add_help=False)
        for flag in ("--repo", "--password-file", "--password-secret"):
            common.add_argument(flag)
        replicate.add_parser(sub, common)
    return p
cli.build_parser = with_replicate
sys.exit(cli.main(sys.argv[1:]))
"""


def vaultflow(args: list[str], env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-c", LAUNCHER, *args], env={**os.environ, **env}, capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, timeout=300)
    assert not check or proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture
def flows(prefect_server, monkeypatch):
    monkeypatch.setenv("VAULTFLOW_PASSWORD", "pw")
    from vaultflow.flows.backup import backup
    from vaultflow.flows.replicate import replicate
    from vaultflow.flows.runtime import run_flow

    def run_backup(repo: Repository, path: Path, source: str):  # type: ignore[no-untyped-def]
        return run_flow(backup, paths=[str(path)], source=source, repository=repo.url)

    def run_replicate(repo: Repository, dest: str, **kw):  # type: ignore[no-untyped-def]
        return run_flow(replicate, destination=dest, repository=repo.url, **kw)

    return argparse.Namespace(backup=run_backup, replicate=run_replicate)


def write_tree(root: Path, seed: int, big: int = 2 << 20) -> dict[bytes, bytes]:
    root.mkdir(parents=True, exist_ok=True)
    files = {b"big.bin": os.urandom(big), b"docs/readme.txt": f"seed {seed}\n".encode() * 5000,
             b"docs/empty": b""}
    for rel, data in files.items():
        (root / os.fsdecode(rel)).parent.mkdir(parents=True, exist_ok=True)
        (root / os.fsdecode(rel)).write_bytes(data)
    return files


def listing(backend: Backend, *prefixes: str) -> dict[str, bytes]:
    return {n: backend.read(n) for p in prefixes for n, _ in backend.list(p)}


def assert_checks(repo: Repository) -> None:
    checker = Checker(repo)
    checker.structure()
    checker.read_packs(sorted(checker.pack_sizes))
    assert checker.report.problems == [], checker.report.problems
    assert read_packs(repo, sorted(checker.pack_sizes))[0] == []


@pytest.mark.parametrize("direction", ["local->s3", "s3->local"])
def test_replica_is_byte_for_byte_checks_restores_the_same_and_copies_only_what_is_new(
        direction, s3_server, tmp_path, monkeypatch, flows):
    s3 = (f"s3://{s3_server.new_bucket()}/repo", s3_server.storage_options)
    local = (str(tmp_path / "repo"), {})
    (src_url, src_opts), (dst_url, dst_opts) = (local, s3) if direction == "local->s3" else (s3, local)
    monkeypatch.setenv("VAULTFLOW_STORAGE_OPTIONS", json.dumps(src_opts))
    monkeypatch.setenv("VAULTFLOW_REPLICA_STORAGE_OPTIONS", json.dumps(dst_opts))
    src = Repository.init(src_url, "pw", storage_options=src_opts, kdf=FAST_KDF)
    files = write_tree(tmp_path / "src", 1)
    flows.backup(src, tmp_path / "src", "docs")
    files = write_tree(tmp_path / "src", 2)
    flows.backup(src, tmp_path / "src", "docs")

    first = flows.replicate(src, dst_url)
    assert first.created and first.records_committed == 2 and first.failed == []
    assert first.lag.snapshots_behind == 0 and first.lag.bytes_behind == 0
    dst = Repository.open(dst_url, "pw", storage_options=dst_opts)  # the source's password opens it
    assert dst.config.id != src.config.id and repl.read_marker(dst.backend, repl.marker_key(src)) == src.config.id
    marker = json.loads(dst.backend.read(repl.MARKER))["vaultflow_replica"]
    assert marker["source_config"].encode() == src.backend.read("config")  # a lost source config comes back
    same = ("keys", "data", "index", "snapshots", "manifests", "tables")
    assert listing(dst.backend, *same) == listing(src.backend, *same)  # byte for byte, nothing more or less
    assert_checks(dst)
    assert read_back(dst, "docs:2") == read_back(src, "docs:2") == {k: v for k, v in files.items()}
    assert read_back(dst, "docs:1")[b"docs/readme.txt"] == b"seed 1\n" * 5000

    packs_before = {n for n, _ in src.backend.list("data")}
    write_tree(tmp_path / "src", 3, big=1 << 20)
    flows.backup(src, tmp_path / "src", "docs")
    new_packs = {n for n, _ in src.backend.list("data")} - packs_before
    second = flows.replicate(src, dst_url, task_runner="processes")  # workers open both ends themselves
    assert not second.created and second.records_committed == 1 and second.packs_copied == len(new_packs) > 0
    assert listing(dst.backend, *same) == listing(src.backend, *same)
    third = flows.replicate(src, dst_url)
    assert third.objects_copied == 0 and third.bytes_copied == 0
    assert_checks(Repository.open(dst_url, "pw", storage_options=dst_opts))


def test_killed_replication_resumes_without_copying_again_and_status_shows_the_lag(
        prefect_server, tmp_path, flows):
    src = Repository.init(str(tmp_path / "repo"), "pw", kdf=FAST_KDF, pack_size=1 << 20)
    (tmp_path / "src").mkdir()
    for i in range(4):
        (tmp_path / "src" / f"f{i}").write_bytes(os.urandom(6 << 20))
    flows.backup(src, tmp_path / "src", "data")
    total = {n: s for n, s in src.backend.list("data")}
    dest = str(tmp_path / "replica")
    env = {"VAULTFLOW_REPOSITORY": src.url, "VAULTFLOW_PASSWORD": "pw", "VAULTFLOW_HOME": str(tmp_path / "home"),
           "PREFECT_API_URL": prefect_server, "VAULTFLOW_REPLICAS": dest}

    before = json.loads(vaultflow(["replicate", "--status", "--json"], env).stdout)["replicas"][0]
    assert not before["exists"] and before["snapshots_behind"] == 1
    assert before["bytes_behind"] >= sum(total.values())

    killed = vaultflow(["replicate", dest], {**env, "VAULTFLOW_REPLICATE_KILL_AFTER": "5"}, check=False)
    assert killed.returncode == -9, killed.stderr
    replica = Backend(dest)
    kept = {n: os.stat(replica.path(n)) for n, _ in replica.list("data")}
    assert 5 <= len(kept) < len(total) and list(replica.list("snapshots")) == []  # records go last
    midway = json.loads(vaultflow(["replicate", "--status", "--json"], env).stdout)["replicas"][0]
    assert midway["exists"] and midway["snapshots_behind"] == 1
    assert midway["bytes_behind"] < before["bytes_behind"]

    resumed = json.loads(vaultflow(["replicate", dest, "--json"], env).stdout)[0]
    assert resumed["packs_copied"] == len(total) - len(kept) and resumed["records_committed"] == 1
    for name, st in kept.items():  # the packs the killed run copied were not sent again
        again = os.stat(replica.path(name))
        assert (again.st_ino, again.st_mtime_ns) == (st.st_ino, st.st_mtime_ns)
    after = json.loads(vaultflow(["replicate", "--status", "--json"], env).stdout)["replicas"][0]
    assert (after["snapshots_behind"], after["objects_behind"], after["bytes_behind"]) == (0, 0, 0)
    assert after["sources"] == {"data": [1, 1]}
    text = vaultflow(["replicate", "--status"], env).stdout
    assert "0 snapshots, 0 objects, 0 B behind" in text and "data: serial 1 on the source, 1 on the replica" in text
    dst = Repository.open(dest, "pw")
    assert_checks(dst)
    assert read_back(dst, "data:1") == read_back(src, "data:1")
    other = Repository.init(str(tmp_path / "other"), "pw", kdf=FAST_KDF).url
    refused = vaultflow(["replicate", other], env, check=False)  # refused before any flow run exists
    assert refused.returncode == 1 and "holds another vaultflow repository" in refused.stderr
    both = vaultflow(["replicate", "--status", "--json"], {**env, "VAULTFLOW_REPLICAS": f"{dest},{other}"},
                     check=False)
    found = json.loads(both.stdout)["replicas"]
    assert both.returncode == 1 and found[0]["error"] is None and "another vaultflow" in found[1]["error"]


def two_sources(tmp_path: Path, flows, private: bool = False) -> Repository:  # type: ignore[no-untyped-def]
    src = Repository.init(str(tmp_path / "repo"), "pw", kdf=FAST_KDF, pack_size=1 << 20, private_manifests=private)
    write_tree(tmp_path / "a", 1)
    write_tree(tmp_path / "b", 2)
    flows.backup(src, tmp_path / "a", "a")
    flows.backup(src, tmp_path / "b", "b")
    return src


def packs_of(repo: Repository, source: str) -> list[str]:
    """The packs the index files of `source`'s newest backup list (its own new data)."""
    _, record = repo.find_snapshot(f"{source}:latest")
    return sorted({p for f in record.index_files for p in repo.read_index_file(f)[0]})


def test_a_source_pack_that_fails_verification_is_not_copied_and_the_run_names_it(tmp_path, flows):
    from vaultflow.flows.replicate import ReplicationIncomplete

    src = two_sources(tmp_path, flows, private=True)  # sealed records and manifests are copied all the same
    bad = packs_of(src, "b")[0]
    data = bytearray(src.backend.read(bad))
    data[100] ^= 1
    src.backend.delete(bad)
    src.backend.write(bad, bytes(data))
    dest = str(tmp_path / "replica")
    with pytest.raises(ReplicationIncomplete) as e:
        flows.replicate(src, dest)
    summary = e.value.summary
    assert summary.failed[0][0] == bad and "not copied" in summary.failed[0][1] and bad in str(e.value)
    dst = Repository.open(dest, "pw")
    assert not dst.backend.exists(bad)
    assert {(r.source, r.serial) for r in dst.snapshots().values()} == {("a", 1)}  # b's data is incomplete
    assert any(name.startswith("snapshots/") and "no pack the replica has" in why for name, why in summary.failed)
    assert_checks(dst)  # b's index file naming the bad pack was withheld: the replica names no missing data


def test_lost_source_packs_are_reported_never_invented_and_records_needing_them_wait(tmp_path, flows):
    from vaultflow.flows.replicate import ReplicationIncomplete

    src = two_sources(tmp_path, flows)
    dest = str(tmp_path / "replica")
    flows.replicate(src, dest, snapshots=["a:latest"])  # only a, up to its latest
    dst = Repository.open(dest, "pw")
    assert {r.source for r in dst.snapshots().values()} == {"a"}
    assert not set(packs_of(src, "b")) & {n for n, _ in dst.backend.list("data")}
    assert_checks(dst)
    kept, lost = packs_of(src, "a")[0], packs_of(src, "b")[0]
    src.backend.delete(kept)  # lost on the source after the replica got it
    src.backend.delete(lost)  # lost before the replica got it
    with pytest.raises(ReplicationIncomplete) as e:
        flows.replicate(src, dest)
    summary = e.value.summary
    assert summary.lost_packs == sorted([kept, lost]) and summary.lost_kept == [kept]
    assert not dst.backend.exists(lost) and dst.backend.exists(kept)
    assert {r.source for r in dst.snapshots().values()} == {"a"} and summary.lag.snapshots_behind == 1
    assert_checks(Repository.open(dest, "pw"))


def test_foreign_repositories_the_source_itself_and_a_diverged_history_are_refused(tmp_path):
    src = Repository.init(str(tmp_path / "repo"), "pw", kdf=FAST_KDF)
    other = Repository.init(str(tmp_path / "other"), "pw", kdf=FAST_KDF)  # same password, its own key
    with pytest.raises(repl.ReplicaError, match="another vaultflow repository"):
        repl.open_replica(src, Backend(other.url))
    with pytest.raises(repl.ReplicaError, match="itself"):
        repl.open_replica(src, Backend(src.url))
    now = utc_now()
    record = SnapshotRecord("docs", 1, now, now, "here", None, None, {})
    rid = src.commit(record)
    replica, created = repl.open_replica(src, Backend(str(tmp_path / "replica")))
    assert created and not repl.open_replica(src, replica.backend)[1]
    theirs = replica.commit(SnapshotRecord("docs", 1, now, now, "elsewhere", None, None, {}))
    plan = repl.plan(src, replica.backend)
    assert [i.digest for i in plan.records] == [rid]
    done = repl.commit_records(src, replica, plan.records)
    assert done.records == [] and "diverged" in done.held[0][1] and theirs[:12] in done.held[0][1]
    assert {name for name, _ in replica.backend.list("snapshots")} == {f"snapshots/{theirs}"}
    forged = replica.backend.read(repl.MARKER).replace(src.config.id.encode(), other.config.id.encode())
    replica.backend.delete(repl.MARKER)
    replica.backend.write(repl.MARKER, forged)
    with pytest.raises(IntegrityError, match="replica marker does not authenticate"):
        repl.open_replica(src, replica.backend)


def test_a_tombstone_is_replicated_in_chain_order_and_forgotten_records_stay_hidden_on_the_replica(
        tmp_path, flows):
    from vaultflow.flows.forget import forget
    from vaultflow.flows.runtime import run_flow

    src = Repository.init(str(tmp_path / "repo"), "pw", kdf=FAST_KDF)
    for seed in (1, 2):
        write_tree(tmp_path / "s", seed, big=1 << 16)
        flows.backup(src, tmp_path / "s", "s")
        time.sleep(0.01)
    dest = str(tmp_path / "replica")
    flows.replicate(src, dest)
    run_flow(forget, keep_last=1, repository=src.url)
    done = flows.replicate(src, dest)
    assert done.records_committed == 1 and done.failed == []  # the tombstone, serial 3
    dst = Repository.open(dest, "pw")
    assert len(list(dst.backend.list("snapshots"))) == 3  # serial 1 stays on the replica, forgotten there too
    assert [r.serial for r in dst.snapshots().values()] == [2]
    assert_checks(dst)
