"""The backup flow end to end, on the real Prefect engine against a real server, on local disk and S3."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import pytest
from backup_helpers import as_unprivileged_user, awkward_tree, entries, read_back, unreadable_report
from conftest import FAST_KDF

from vaultflow.storage import archiver
from vaultflow.storage.repository import Repository


@pytest.fixture
def repo_env(location, prefect_server, monkeypatch):
    """A fresh repository at `location`, with the env a flow run reads its password and options from."""
    monkeypatch.setenv("VAULTFLOW_PASSWORD", "pw")
    monkeypatch.setenv("VAULTFLOW_STORAGE_OPTIONS", json.dumps(location.storage_options))
    repo = Repository.init(location.url, "pw", storage_options=location.storage_options, kdf=FAST_KDF)
    return repo


def run_backup(repo: Repository, path: Path, **kw):
    from vaultflow.flows.backup import backup
    from vaultflow.flows.runtime import run_flow

    return run_flow(backup, paths=[str(path)], repository=repo.url, **kw)


def reopen(repo: Repository) -> Repository:
    return Repository.open(repo.url, "pw", storage_options=repo.backend.fs.storage_options)


def test_awkward_tree_round_trips_and_records_every_entry(repo_env, tmp_path):
    src = tmp_path / "src"
    files = awkward_tree(src)
    time.sleep(0.01)
    summary = run_backup(repo_env, src, source="awkward")
    assert summary.errors == 0 and summary.files == len(files)
    repo = reopen(repo_env)
    assert read_back(repo) == files  # every byte back, non-UTF-8 name included
    rows = entries(repo)
    assert rows[b"latin1-\xe9t\xe9.txt"]["raw_path"] == b"latin1-\xe9t\xe9.txt"
    assert rows["unicodé/naïve.txt".encode()]["raw_path"] is None
    assert rows[b"data/link-to-readme"]["type"] == "symlink"
    assert rows[b"data/link-to-readme"]["link_target"] == b"../docs/readme.txt"
    assert rows[b"link-outside"]["link_target"] == b"/etc" and not any(p.startswith(b"link-outside/") for p in rows)
    assert rows[b"fifo"]["type"] == "fifo" and rows[b"fifo"]["chunks"] is None  # recorded, never read
    assert rows[b"socket"]["type"] == "socket"
    assert rows[b"empty-dir"]["type"] == "dir"
    assert rows[b"docs/empty.txt"]["chunks"] == [] and rows[b"docs/empty.txt"]["size"] == 0
    hard = rows[b"docs/hardlink.txt"], rows[b"docs/readme.txt"]
    assert hard[0]["inode"] == hard[1]["inode"] and hard[0]["nlink"] == 2
    assert len(rows[b"data/big.bin"]["chunks"]) >= 3  # 20 MiB > the 8 MiB maximum: streamed in pieces
    assert summary.bytes_added < summary.bytes_read  # the repetitive file deduplicated within itself
    assert summary.chunks_verified > 0


def test_second_backup_reads_only_what_changed_and_full_rereads_all(repo_env, tmp_path):
    src = tmp_path / "src"
    sizes = {}
    for i in range(100):
        data = os.urandom(1000 + i)
        (src / f"d{i % 7}").mkdir(parents=True, exist_ok=True)
        (src / f"d{i % 7}" / f"f{i}").write_bytes(data)
        sizes[f"d{i % 7}/f{i}"] = len(data)
    old = time.time() - 60  # outside the racy-mtime window, as files are in a real tree
    for p in src.rglob("f*"):
        os.utime(p, (old, old))
    first = run_backup(repo_env, src, source="tree")
    assert first.files_new == 100 and first.bytes_read == sum(sizes.values())

    with open(src / "d1" / "f1", "ab") as f:  # change 1 % of the files
        f.write(b"appended")
    second = run_backup(repo_env, src, source="tree")
    assert (second.files_changed, second.files_unchanged, second.files_new) == (1, 99, 0)
    assert second.bytes_read == sizes["d1/f1"] + 8  # only the changed file was read
    assert second.serial == 2

    full = run_backup(repo_env, src, source="tree", full=True)
    assert full.bytes_read == sum(sizes.values()) + 8 and full.bytes_added == 0
    assert full.files_unchanged == 100  # reread, found identical
    repo = reopen(repo_env)
    records = repo.snapshots()
    chain = sorted(records.items(), key=lambda kv: kv[1].serial)
    assert [r.serial for _, r in chain] == [1, 2, 3]
    assert chain[1][1].previous == chain[0][0] and chain[2][1].previous == chain[1][0]


def test_racy_mtime_files_are_reread(repo_env, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "hot").write_bytes(b"x" * 100)
    soon = time.time() + 30  # "modified" around the first backup's start however slowly it starts: racy
    os.utime(src / "hot", (soon, soon))
    (src / "cold").write_bytes(b"y" * 10)
    old = time.time() - 60
    os.utime(src / "cold", (old, old))
    run_backup(repo_env, src, source="racy")
    again = run_backup(repo_env, src, source="racy")
    assert again.bytes_read == 100 and again.files_unchanged == 2


def test_plan_marks_racy_and_unchanged_rows():
    import pyarrow as pa

    from vaultflow.storage.manifest import FILES_SCHEMA
    from vaultflow.tasks.sources.base import LISTING_SCHEMA

    now = time.time_ns()  # the parent backup started now
    base = {"raw_path": None, "type": "file", "size": 5, "mode": 0o100644, "uid": 0, "gid": 0, "ctime_ns": 1,
            "inode": 7, "dev": 1, "nlink": 1, "link_target": None}
    listing = pa.Table.from_pylist([{**base, "key": b"old", "path": "old", "mtime_ns": now - 10**10},
                                    {**base, "key": b"hot", "path": "hot", "mtime_ns": now - 10}],
                                   schema=LISTING_SCHEMA)
    parent = pa.Table.from_pylist([{**base, "path": "old", "mtime_ns": now - 10**10, "content_hash": b"h" * 32,
                                    "chunks": [b"c" * 32], "status": "new", "error": None},
                                   {**base, "path": "hot", "mtime_ns": now - 10, "content_hash": b"g" * 32,
                                    "chunks": [b"d" * 32], "status": "new", "error": None}], schema=FILES_SCHEMA)
    plan = archiver.plan_changes(listing, parent, now, full=False).to_pylist()
    by_path = {r["path"]: r for r in plan}
    assert by_path["old"]["read"] is False and by_path["old"]["chunks"] == [b"c" * 32]
    assert by_path["hot"]["read"] is True and by_path["hot"]["chunks"] is None


def test_vanishing_file_is_recorded_not_fatal(repo_env, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "stays").write_bytes(b"data")
    session = repo_env.write_session()
    results, stats = archiver.archive_files(repo_env, session, str(src), [b"stays", b"gone-before-read"])
    assert results["error"].to_pylist() == [None, "vanished before it could be read"]
    assert stats.errors == 1 and stats.files == 2


def test_file_changing_while_read_is_flagged(repo_env, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    log = src / "growing.log"
    log.write_bytes(os.urandom(64 << 20))
    stop = threading.Event()

    def append() -> None:
        with open(log, "ab") as f:
            while not stop.is_set():
                f.write(b"new line\n" * 100)
                f.flush()
                time.sleep(0.0005)

    writer = threading.Thread(target=append)
    writer.start()
    try:
        time.sleep(0.01)
        results, stats = archiver.archive_files(repo_env, repo_env.write_session(), str(src), [b"growing.log"])
    finally:
        stop.set()
        writer.join()
    assert "changed while being read" in results["error"][0].as_py()
    assert results["chunks"][0].as_py()  # what was read is kept, flagged
    assert stats.errors == 1


def test_unreadable_files_and_dirs_are_recorded():
    """Permission errors while listing and reading are recorded per path; the rest is backed up."""
    base = Path(tempfile.mkdtemp(prefix="vf-unreadable-"))
    try:
        Repository.init(str(base / "repo"), "pw", kdf=FAST_KDF)
        src = base / "src"
        (src / "locked-dir").mkdir(parents=True)
        (src / "locked-dir" / "inside").write_bytes(b"x")
        (src / "secret").write_bytes(b"top secret")
        (src / "fine").write_bytes(b"fine")
        os.chmod(src / "secret", 0)
        os.chmod(src / "locked-dir", 0)
        discover_errors, read_errors = as_unprivileged_user(unreadable_report, str(src), str(base / "repo"))
        assert discover_errors == ["locked-dir: directory unreadable: Permission denied"]
        assert read_errors == ["permission denied", None]
    finally:
        os.chmod(base / "src" / "locked-dir", 0o755)
        shutil.rmtree(base)


def test_private_manifests_keep_paths_out_of_storage(location, prefect_server, monkeypatch, tmp_path):
    monkeypatch.setenv("VAULTFLOW_PASSWORD", "pw")
    monkeypatch.setenv("VAULTFLOW_STORAGE_OPTIONS", json.dumps(location.storage_options))
    repo = Repository.init(location.url, "pw", storage_options=location.storage_options, kdf=FAST_KDF,
                           private_manifests=True)
    src = tmp_path / "src"
    src.mkdir()
    (src / "salary-review-2026.xlsx").write_bytes(b"confidential")
    summary = run_backup(repo, src, source="hr")
    names = [n for n, _ in repo.backend.list("")]
    assert any(n.startswith("manifests/source=hr/snapshot=1/files-") and n.endswith(".parquet.enc") for n in names)
    assert not any(n.startswith("tables/") for n in names)  # no clear-text analytics tables either
    for name in names:
        assert b"salary-review" not in repo.backend.read(name), name
    assert read_back(reopen(repo)) == {b"salary-review-2026.xlsx": b"confidential"}
    assert summary.files == 1


def test_several_paths_are_stored_relative_to_their_common_folder(repo_env, tmp_path):
    home = tmp_path / "home"
    (home / "docs" / "deep").mkdir(parents=True)
    (home / "docs" / "deep" / "a.txt").write_text("a")
    (home / "photos").mkdir()
    (home / "photos" / "p.jpg").write_bytes(b"jpg")
    (home / "skipped").mkdir()
    (home / "skipped" / "s").write_text("not asked for")
    (home / "notes.txt").write_text("n")
    from vaultflow.flows.backup import backup
    from vaultflow.flows.runtime import run_flow

    summary = run_flow(backup, paths=[str(home / "docs"), str(home / "photos"), str(home / "notes.txt"),
                                      str(home / "docs" / "deep")], repository=repo_env.url)
    assert summary.source == default_name(home)
    repo = reopen(repo_env)
    assert sorted(entries(repo)) == [b"docs", b"docs/deep", b"docs/deep/a.txt", b"notes.txt", b"photos",
                                     b"photos/p.jpg"]
    _, record = repo.find_snapshot("latest")
    assert record.paths == [str(home / p) for p in ("docs", "photos", "notes.txt", "docs/deep")]  # as given


def default_name(folder: Path) -> str:
    from vaultflow.flows.backup import default_source_name

    return default_source_name([str(folder / "x"), str(folder / "y")])


def test_password_from_a_prefect_secret_block_never_reaches_the_run(prefect_server, monkeypatch, tmp_path):
    from prefect.blocks.system import Secret
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.sorting import FlowRunSort

    Secret(value="from-the-block").save("vaultflow-test-password", overwrite=True)
    monkeypatch.delenv("VAULTFLOW_PASSWORD", raising=False)
    monkeypatch.delenv("VAULTFLOW_STORAGE_OPTIONS", raising=False)
    repo = Repository.init(str(tmp_path / "repo"), "from-the-block", kdf=FAST_KDF)
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("x")
    summary = run_backup(repo, src, password_secret="vaultflow-test-password")
    assert summary.files == 1
    with get_client(sync_client=True) as client:
        run = client.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=1)[0]
    assert run.parameters["password_secret"] == "vaultflow-test-password"
    assert "from-the-block" not in json.dumps(run.parameters)


def test_errors_table_keeps_the_exact_bytes_of_names_that_are_not_utf8():
    from vaultflow.storage.manifest import FILES_SCHEMA, errors_table

    files = FILES_SCHEMA.empty_table()
    table = errors_table(files, [(b"caf\xe9-dir", "directory unreadable: Permission denied")])
    [row] = table.to_pylist()
    assert row["raw_path"] == b"caf\xe9-dir" and row["path"] == "caf\\xe9-dir" and row["stage"] == "discover"
