"""Tasks that run anywhere: the same backup and restore on threads, on worker processes and on a Dask cluster of
two worker processes give byte-identical results; no task parameter carries a secret or refuses to pickle."""

from __future__ import annotations

import json
import os
import pickle
import uuid
from pathlib import Path

import cloudpickle
import pyarrow.compute as pc
import pytest
from conftest import FAST_KDF

from vaultflow.storage.manifest import raw_paths
from vaultflow.storage.repository import Repository

PASSWORD = "correct horse " + uuid.uuid4().hex  # unique: found in a pickle only if it leaked


def make_tree(root: Path) -> dict[bytes, bytes]:
    """5,000 small files (three batches of at most 2,048), big files with the same content in batches far apart
    (two workers may store the same chunks), a non-UTF-8 name, a symlink and a hard link."""
    files: dict[bytes, bytes] = {}
    for i in range(5000):
        files[f"small/{i // 100:02d}/f{i:05d}.txt".encode()] = f"file {i} ".encode() * (1 + i % 37)
    big = os.urandom(3 << 20)
    files[b"a-first/big.bin"] = big
    files[b"z-last/big-copy.bin"] = big
    files[b"z-last/other.bin"] = os.urandom(1 << 20) + big[:1 << 20]
    files[b"caf\xe9-latin1.txt"] = b"not UTF-8"
    for rel, data in files.items():
        p = os.path.join(os.fsencode(root), rel)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb") as f:
            f.write(data)
    os.symlink(b"small/00/f00000.txt", os.path.join(os.fsencode(root), b"link"))
    os.link(os.path.join(os.fsencode(root), b"z-last/other.bin"), os.path.join(os.fsencode(root), b"hard"))
    return files


def tree_state(root: Path) -> dict[bytes, tuple[object, ...]]:
    """Every entry's type, bytes (or link target), mode and mtime."""
    out: dict[bytes, tuple[object, ...]] = {}
    base = os.fsencode(root)
    for dirpath, dirnames, filenames in os.walk(base):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            rel = os.path.relpath(p, base)
            if os.path.islink(p):
                out[rel] = ("link", os.readlink(p))
            elif os.path.isdir(p):
                out[rel] = ("dir", st.st_mode)
            else:
                with open(p, "rb") as f:
                    out[rel] = ("file", f.read(), st.st_mode, st.st_mtime_ns, st.st_nlink)
    return out


@pytest.fixture
def env(tmp_path, prefect_server, monkeypatch):
    monkeypatch.setenv("VAULTFLOW_PASSWORD", PASSWORD)
    monkeypatch.setenv("VAULTFLOW_STORAGE_OPTIONS", "{}")
    src = tmp_path / "src"
    files = make_tree(src)
    repo = Repository.init(str(tmp_path / "repo"), PASSWORD, kdf=FAST_KDF)
    return repo, src, files


def backup(repo: Repository, src: Path, source: str, task_runner: str, **kw):
    from vaultflow.flows.backup import backup as flow
    from vaultflow.flows.runtime import run_flow

    return run_flow(flow, paths=[str(src)], source=source, repository=repo.url, task_runner=task_runner, **kw)


def restore(repo: Repository, snapshot: str, target: Path, task_runner: str):
    from vaultflow.flows.restore import restore as flow
    from vaultflow.flows.runtime import run_flow

    return run_flow(flow, snapshot=snapshot, target=str(target), repository=repo.url, task_runner=task_runner)


def files_of(repo: Repository, snapshot: str) -> dict[bytes, tuple[object, ...]]:
    table = repo.files_table(repo.snapshot(snapshot))
    keep = ["type", "size", "mode", "mtime_ns", "content_hash", "chunks", "link_target", "status"]
    return dict(zip(raw_paths(table).to_pylist(), zip(*(table[c].to_pylist() for c in keep), strict=True),
                    strict=True))


def test_backup_and_restore_on_processes_equal_threads(env, tmp_path):
    repo, src, _ = env
    on_threads = backup(repo, src, "t", "threads")
    on_processes = backup(repo, src, "p", "processes", full=True)
    assert on_processes.files == on_threads.files == 5005
    assert on_processes.bytes_added == 0  # the workers' index had everything the thread run stored
    fresh = Repository.open(repo.url, PASSWORD)
    assert files_of(fresh, on_processes.snapshot) == files_of(fresh, on_threads.snapshot)

    want = tree_state(src)
    for runner_name in ("threads", "processes"):
        target = tmp_path / f"restored-{runner_name}"
        result = restore(repo, on_processes.snapshot, target, runner_name)
        assert result.failed == {}
        assert tree_state(target) == want, runner_name


def test_a_fresh_backup_on_processes_stores_every_chunk_and_check_reads_them_on_processes(env, tmp_path):
    from vaultflow.flows.check import check
    from vaultflow.flows.runtime import run_flow

    repo, src, files = env
    summary = backup(repo, src, "p", "processes")
    assert summary.errors == 0 and summary.files == 5005
    fresh = Repository.open(repo.url, PASSWORD)
    record = fresh.snapshot(summary.snapshot)
    assert summary.packs_uploaded > 0 and len(record.index_files) >= 3  # one index file per batch at least
    assert record.stats["blobs_duplicate"] >= 0
    table = fresh.files_table(record)
    chunks = pc.list_flatten(table["chunks"]).unique().to_pylist()
    assert all(fresh.index.contains_many(chunks))  # every referenced chunk indexed by the workers' index files
    report = run_flow(check, read_data=True, repository=repo.url, task_runner="processes")
    assert report["ok"] and report["packs_read"] == report["packs"] > 0


@pytest.fixture(scope="module")
def dask_cluster():
    """A Dask cluster of two worker *processes* on this machine, as a user's cluster would be reached."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        yield cluster


def test_backup_and_restore_through_a_dask_cluster_equal_threads(env, tmp_path, dask_cluster):
    repo, src, _ = env
    address = dask_cluster.scheduler_address
    # The workers were started before this test: they learn the password the way a real cluster's would, from
    # their own environment (VAULTFLOW_PASSWORD), set for them here through the Dask client.
    from distributed import Client

    with Client(address) as client:
        values = {"VAULTFLOW_PASSWORD": PASSWORD, "VAULTFLOW_STORAGE_OPTIONS": "{}"}
        client.run(lambda: os.environ.update(values))  # a lambda: a bound method would update a pickled copy
        pids = set(client.run(os.getpid).values())
    assert os.getpid() not in pids and len(pids) == 2

    on_threads = backup(repo, src, "t", "threads")
    on_dask = backup(repo, src, "d", f"dask://{address.removeprefix('tcp://')}", full=True)
    fresh = Repository.open(repo.url, PASSWORD)
    assert files_of(fresh, on_dask.snapshot) == files_of(fresh, on_threads.snapshot)

    target = tmp_path / "restored-dask"
    result = restore(repo, on_dask.snapshot, target, address)
    assert result.failed == {}
    assert tree_state(target) == tree_state(src)


def test_every_task_parameter_pickles_and_holds_no_secret(tmp_path, prefect_server, monkeypatch, s3_server):
    """Run backup, restore and check on S3 with a password and an S3 secret, recording every task run's
    parameters: each pickles (cloudpickle, as process and Dask runners send them) and contains neither."""
    import prefect.task_engine as engine

    secret = "s3-secret-" + uuid.uuid4().hex
    options = {**s3_server.storage_options, "secret": secret}
    monkeypatch.setenv("VAULTFLOW_PASSWORD", PASSWORD)
    monkeypatch.setenv("VAULTFLOW_STORAGE_OPTIONS", json.dumps(options))
    url = f"s3://{s3_server.new_bucket()}/repo"
    repo = Repository.init(url, PASSWORD, storage_options=options, kdf=FAST_KDF)
    src = tmp_path / "src"
    make_tree(src)

    recorded: list[tuple[str, dict]] = []
    real = engine.run_task_sync

    def recording(task, *args, parameters=None, **kwargs):
        recorded.append((task.name, dict(parameters or {})))
        return real(task, *args, parameters=parameters, **kwargs)

    monkeypatch.setattr(engine, "run_task_sync", recording)
    summary = backup(repo, src, "s", "threads")
    restore(repo, summary.snapshot, tmp_path / "out", "threads")
    from vaultflow.flows.check import check
    from vaultflow.flows.runtime import run_flow

    run_flow(check, read_data=True, repository=url, task_runner="threads")

    names = {name for name, _ in recorded}
    assert {"open_repository", "process_batch", "write_manifest", "commit_snapshot", "plan_restore",
            "restore_packs", "check_packs"} <= names, names
    for name, params in recorded:
        data = cloudpickle.dumps(params)
        assert pickle.loads(data).keys() == params.keys()
        for leaked in (PASSWORD.encode(), secret.encode()):
            assert leaked not in data, f"{name} carries a secret in its parameters"


def test_auto_takes_processes_only_for_a_backup_of_many_files(monkeypatch):
    from vaultflow.storage.errors import VaultflowError
    from vaultflow.tasks import runner

    monkeypatch.delenv("VAULTFLOW_TASK_RUNNER", raising=False)
    monkeypatch.setenv("VAULTFLOW_WORKERS", "2")
    many = runner.BACKUP_PROCESSES_FROM_FILES
    assert runner.choose("auto", many, many) == "processes"
    assert runner.choose("auto", many - 1, many) == "threads"
    assert runner.choose("auto", 10**9) == "threads"  # check and restore: no threshold, never processes
    assert runner.choose(None, many, many) == "processes"
    monkeypatch.setenv("VAULTFLOW_WORKERS", "1")
    assert runner.choose("auto", many, many) == "threads"  # one worker: nothing to parallelise
    monkeypatch.setenv("VAULTFLOW_TASK_RUNNER", "processes")
    assert runner.choose("auto", 0) == "processes"  # the machine's setting replaces the default
    assert runner.choose("threads", 0) == "threads"  # an explicit choice wins over it
    assert runner.choose("dask://sched:8786") == "tcp://sched:8786"
    with pytest.raises(VaultflowError, match="use auto, threads, processes, or dask://HOST:PORT"):
        runner.choose("ray://x")
