"""`check` covers what no record hash covers: every key file, the config's exact bytes, and the derived
tables/snapshots rows, which must agree with the authenticated records."""

from __future__ import annotations

import json
import os
from datetime import timedelta

import pytest
from conftest import FAST_KDF

from vaultflow.storage import manifest
from vaultflow.storage.checker import Checker
from vaultflow.storage.errors import IntegrityError
from vaultflow.storage.keys import MasterKey, wrap_master_key
from vaultflow.storage.repository import Repository


def make(location) -> Repository:
    return Repository.init(location.url, "pw", storage_options=location.storage_options, kdf=FAST_KDF)


def reopen(location, password: str = "pw") -> Repository:
    return Repository.open(location.url, password, storage_options=location.storage_options)


def replace(repo: Repository, name: str, data: bytes) -> None:
    repo.backend.delete(name)
    repo.backend.write(name, data)


def problems(repo: Repository, kind: str) -> list:  # type: ignore[type-arg]
    return [p for p in Checker(repo).structure().problems if p.kind == kind]


def test_check_reports_every_damaged_key_file_not_only_the_one_that_opened(location):
    repo = make(location)
    second = repo.add_key("second", FAST_KDF)
    third = repo.add_key("third", FAST_KDF)
    assert problems(repo, "key") == []
    data = bytearray(repo.backend.read(second))
    data[len(data) // 2] ^= 0x01
    replace(repo, second, bytes(data))
    # well-formed, valid checksum, but wrapping another repository's master key: only the master key tells
    replace(repo, third, wrap_master_key(MasterKey.generate(), "third", FAST_KDF))
    found = problems(reopen(location), "key")
    assert sorted(p.object for p in found) == sorted([second, third])
    assert any("checksum" in p.message for p in found if p.object == second)
    assert any("master key" in p.message for p in found if p.object == third)


@pytest.mark.parametrize("change", ["upper", "non-hex", "extra space", "extra field"])
def test_config_must_be_exactly_what_vaultflow_wrote(location, change):
    repo = make(location)
    data = repo.backend.read("config")
    outer = json.loads(data)
    mac = outer["mac"]
    letter = next(i for i, c in enumerate(mac) if c in "abcdef")
    if change == "upper":  # bytes.fromhex accepted this one-bit change (0x20) as the same MAC
        bad = data.replace(mac.encode(), (mac[:letter] + mac[letter].upper() + mac[letter + 1:]).encode())
    elif change == "non-hex":  # raised ValueError instead of naming the config
        bad = data.replace(mac.encode(), (mac[:letter] + "g" + mac[letter + 1:]).encode())
    elif change == "extra space":
        bad = data.replace(b'"mac":', b'"mac": ')
    else:
        outer["note"] = "added"
        bad = json.dumps(outer, sort_keys=True, separators=(",", ":")).encode() + b"\n"
    assert bad != data
    replace(repo, "config", bad)
    with pytest.raises(IntegrityError, match="config"):
        reopen(location)
    found = problems(repo, "config")  # the session opened before the change: check still sees it
    assert [p.object for p in found] == ["config"]


@pytest.fixture
def backed_up(location, prefect_server, monkeypatch, tmp_path):
    """A repository with two real backups of one source (so two tables/snapshots rows)."""
    from vaultflow.flows.backup import backup
    from vaultflow.flows.runtime import run_flow

    monkeypatch.setenv("VAULTFLOW_PASSWORD", "pw")
    monkeypatch.setenv("VAULTFLOW_STORAGE_OPTIONS", json.dumps(location.storage_options))
    make(location)
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.bin").write_bytes(os.urandom(100_000))
    run_flow(backup, paths=[str(src)], source="tree", repository=location.url)
    (src / "b.txt").write_text("second\n")
    run_flow(backup, paths=[str(src)], source="tree", repository=location.url)
    return reopen(location)


def test_snapshot_table_rows_must_agree_with_their_records(backed_up):
    repo = backed_up
    name = manifest.snapshots_name("tree", 2)
    assert repo.backend.exists(name)
    assert problems(repo, "table") == []  # what the backup wrote agrees with its records

    row = manifest.from_parquet(repo.backend.read(name), manifest.SNAPSHOTS_SCHEMA, name).to_pylist()[0]
    forged = {**row, "finished": row["finished"] + timedelta(days=30), "files": 1000}
    replace(repo, name, manifest.to_parquet(manifest.table_from_rows([forged], manifest.SNAPSHOTS_SCHEMA)))
    orphan = manifest.snapshots_name("tree", 9)
    repo.backend.write(orphan, manifest.to_parquet(manifest.table_from_rows([{**row, "serial": 9}],
                                                                            manifest.SNAPSHOTS_SCHEMA)))
    junk = manifest.snapshots_name("tree", 1)
    replace(repo, junk, b"PAR1 not parquet")
    stray = "tables/snapshots/source=tree/notes.txt"
    repo.backend.write(stray, b"hello")
    found = {p.object: p for p in problems(repo, "table")}
    assert set(found) == {name, orphan, junk, stray}
    assert "disagrees" in found[name].message and "finished" in found[name].message
    assert "files" in found[name].message and found[name].snapshots
    assert "orphan" in found[orphan].message
    assert "unreadable" in found[junk].message
    assert "unexpected object" in found[stray].message
