"""Restore and check: byte-exact round trips, and every tamper case caught by name, on local disk and S3."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from conftest import FAST_KDF

from vaultflow.storage.checker import Checker, rebuild_index
from vaultflow.storage.errors import VaultflowError
from vaultflow.storage.repository import Repository
from vaultflow.storage.restorer import Restorer, select


@pytest.fixture
def backed_up(location, prefect_server, monkeypatch, tmp_path):
    """A repository (1 MiB packs) holding two snapshots of a tree of 12 random 300 KB files."""
    from vaultflow.flows.backup import backup
    from vaultflow.flows.runtime import run_flow

    monkeypatch.setenv("VAULTFLOW_PASSWORD", "pw")
    monkeypatch.setenv("VAULTFLOW_STORAGE_OPTIONS", json.dumps(location.storage_options))
    Repository.init(location.url, "pw", storage_options=location.storage_options, kdf=FAST_KDF, pack_size=1 << 20)
    src = tmp_path / "src"
    for i in range(12):
        (src / f"d{i % 2}").mkdir(parents=True, exist_ok=True)
        (src / f"d{i % 2}" / f"f{i:02d}.bin").write_bytes(os.urandom(300_000))
    run_flow(backup, paths=[str(src)], source="tree", repository=location.url)
    time.sleep(0.01)
    (src / "d0" / "new.txt").write_text("second snapshot\n")
    run_flow(backup, paths=[str(src)], source="tree", repository=location.url)
    return Repository.open(location.url, "pw", storage_options=location.storage_options), src


def restore_all(repo: Repository, target: Path, spec: str = "latest"):
    _, record = repo.find_snapshot(spec)
    return Restorer(repo, repo.files_table(record), str(target)).run()


def rewrite(repo: Repository, name: str, change) -> None:  # type: ignore[no-untyped-def]
    data = change(repo.backend.read(name))
    repo.backend.delete(name)
    if data is not None:
        repo.backend.write(name, data)


def flip(data: bytes, at: int) -> bytes:
    b = bytearray(data)
    b[at] ^= 0x01
    return bytes(b)


def one_pack(repo: Repository) -> tuple[str, list[str]]:
    """A pack of the first snapshot (so both snapshots use it) and the paths of the files it holds chunks of."""
    packs = [n for n, _ in repo.backend.list("data")]
    _, record = repo.find_snapshot("tree:1")
    table = repo.files_table(record)
    for pack in packs:
        ids = {e.id for p, e in repo.index.entries() if p == pack}
        paths = [row["path"] for row in table.to_pylist() if row["chunks"] and ids & set(row["chunks"])]
        if paths and len(paths) < table.num_rows - 4:
            return pack, paths
    raise AssertionError("no pack holds only some files")


def problems(repo: Repository, read_data: bool = False) -> list:  # type: ignore[type-arg]
    fresh = Repository.open(repo.url, "pw", storage_options=repo.backend.fs.storage_options)
    checker = Checker(fresh)
    checker.structure()
    if read_data:
        checker.read_packs(checker.select_packs(None))
    checker.affected()
    return checker.report.problems + checker.report.notices  # notices: kind and message tell them apart


def test_clean_repository_checks_and_restores_byte_for_byte(backed_up, tmp_path):
    repo, src = backed_up
    assert problems(repo, read_data=True) == []
    result = restore_all(repo, tmp_path / "out")
    assert result.ok and result.files == 13
    assert subprocess.run(["diff", "-r", str(src), str(tmp_path / "out")]).returncode == 0


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_damaged_pack_is_named_and_only_its_files_fail_to_restore(backed_up, tmp_path, damage):
    repo, src = backed_up
    pack, hit = one_pack(repo)
    size = repo.backend.size(pack)
    change = {"flip": lambda d: flip(d, 100), "truncate": lambda d: d[: size - 100], "delete": lambda d: None}[damage]
    rewrite(repo, pack, change)
    found = problems(repo, read_data=True)
    assert any(p.object == pack for p in found), found
    named = next(p for p in found if p.object == pack)
    assert set(hit) <= {f.split(":", 1)[1] for f in named.files} and len(named.snapshots) == 2
    if damage == "flip":  # structure alone cannot see a flipped byte; reading the data does
        assert not any(p.object == pack for p in problems(repo, read_data=False))
    fresh = Repository.open(repo.url, "pw", storage_options=repo.backend.fs.storage_options)
    result = restore_all(fresh, tmp_path / "out")
    assert set(result.failed) == set(hit)  # loud for the affected files …
    assert all(pack in why or "damaged" in why for why in result.failed.values())
    for path in ("d0/new.txt", *[f"d{i % 2}/f{i:02d}.bin" for i in range(12) if f"d{i % 2}/f{i:02d}.bin" not in hit]):
        assert (tmp_path / "out" / path).read_bytes() == (src / path).read_bytes()  # … the rest comes back


def test_deleted_index_file_is_reported_and_repair_rebuilds_it(backed_up, tmp_path):
    repo, _ = backed_up
    victim = next(n for n, _ in repo.backend.list("index"))
    repo.backend.delete(victim)
    found = problems(repo)
    assert any(p.kind == "chunk" and p.files for p in found)
    assert any(p.kind == "pack" and "in no index file" in p.message for p in found)
    fresh = Repository.open(repo.url, "pw", storage_options=repo.backend.fs.storage_options)
    packs, chunks, unreadable = rebuild_index(fresh)
    assert unreadable == [] and chunks >= 13
    assert problems(repo, read_data=True) == []
    assert restore_all(fresh, tmp_path / "out").ok


def test_damaged_index_file_is_named(backed_up):
    repo, _ = backed_up
    victim = next(n for n, _ in repo.backend.list("index"))
    rewrite(repo, victim, lambda d: flip(d, 50))
    assert any(p.kind == "index" and p.object == victim for p in problems(repo))


def test_tampered_manifest_is_named_and_restore_refuses_it(backed_up, tmp_path):
    repo, _ = backed_up
    rid, record = repo.find_snapshot("tree:1")
    [name] = [n for n in record.manifests if n.startswith("manifests/")]
    rewrite(repo, name, lambda d: flip(d, len(d) // 2))
    found = problems(repo)
    assert any(p.kind == "manifest" and p.object == name and rid in p.snapshots for p in found)
    with pytest.raises(VaultflowError, match=name):
        restore_all(repo, tmp_path / "out", "tree:1")
    assert restore_all(repo, tmp_path / "ok", "tree:2").ok  # the other snapshot is unaffected


def test_tampered_record_is_named(backed_up):
    repo, _ = backed_up
    second = repo.find_snapshot("tree:2")[0]
    rewrite(repo, f"snapshots/{second}", lambda d: d.replace(b'"serial":2', b'"serial":3'))
    found = problems(repo)
    assert any(p.kind == "snapshot" and p.object == f"snapshots/{second}" for p in found)


def test_deleted_and_replayed_records_break_the_chain(backed_up):
    repo, _ = backed_up
    first, second = (repo.find_snapshot(f"tree:{n}")[0] for n in (1, 2))
    data_first = repo.backend.read(f"snapshots/{first}")
    repo.backend.delete(f"snapshots/{first}")
    found = problems(repo)
    assert any(p.kind == "chain" and "gap" in p.message and "serial 1" in p.message for p in found)
    repo.backend.write(f"snapshots/{first}", data_first)  # put back: clean again
    assert problems(repo) == []
    # A replay: an older record stored again under another name (e.g. to roll the source back)
    repo.backend.write(f"snapshots/{'0' * 64}", data_first)
    assert any(p.kind == "snapshot" and "does not hash to its name" in p.message for p in problems(repo))


def test_restore_refuses_a_non_empty_target_unless_overwrite(backed_up, tmp_path):
    repo, src = backed_up
    out = tmp_path / "out"
    out.mkdir()
    (out / "d0").mkdir()
    (out / "d0" / "f00.bin").write_bytes(b"precious")
    with pytest.raises(VaultflowError, match="not empty"):
        restore_all(repo, out)
    assert (out / "d0" / "f00.bin").read_bytes() == b"precious"
    _, record = repo.find_snapshot("latest")
    assert Restorer(repo, repo.files_table(record), str(out), overwrite=True).run().ok
    assert (out / "d0" / "f00.bin").read_bytes() == (src / "d0" / "f00.bin").read_bytes()


def test_include_restores_only_the_chosen_paths(backed_up, tmp_path):
    repo, src = backed_up
    _, record = repo.find_snapshot("latest")
    table = select(repo.files_table(record), ["d1/f03.bin", "d0/"])
    assert Restorer(repo, table, str(tmp_path / "out")).run().ok
    got = sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*"))
    assert got == ["d0", *sorted(f"d0/{n}" for n in os.listdir(src / "d0")), "d1", "d1/f03.bin"]
