"""What an interrupted run leaves is a notice, not damage; damage stays damage; one rule for restore's exit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from conftest import FAST_KDF
from test_hostile_restore import malicious_snapshot

from vaultflow.storage.checker import Checker
from vaultflow.storage.lock import STALE_AFTER
from vaultflow.storage.pack import BlobType
from vaultflow.storage.repository import Repository
from vaultflow.storage.restorer import Restorer


def unindexed_pack(repo: Repository) -> str:
    """A pack uploaded by a run killed before it wrote its index file."""
    session = repo.write_session()
    data = os.urandom(5000)
    session.packer().add(repo.chunk_id(data), BlobType.DATA, data)
    session.flush()  # uploaded, never indexed
    session.close()
    [(name, _)] = list(repo.backend.list("data"))
    return name


def test_an_interrupted_runs_pack_is_a_notice_and_check_passes(location):
    repo = Repository.init(location.url, "pw", storage_options=location.storage_options, kdf=FAST_KDF)
    pack = unindexed_pack(repo)
    report = Checker(Repository.open(location.url, "pw", storage_options=location.storage_options)).structure()
    assert report.ok, report.problems
    assert [n.object for n in report.notices] == [pack]
    assert "next backup adopts it" in report.notices[0].message


def test_a_partial_upload_is_a_notice_and_the_next_backup_removes_it_once_old(tmp_path):
    repo = Repository.init(str(tmp_path / "repo"), "pw", kdf=FAST_KDF)
    folder = tmp_path / "repo" / "data" / "ab"
    folder.mkdir(parents=True)
    old, young = folder / ".tmp-abc-1111", folder / ".tmp-abd-2222"
    old.write_bytes(b"half a pack")
    young.write_bytes(b"a pack being written right now")
    past = time.time() - STALE_AFTER - 60
    os.utime(old, (past, past))
    report = Checker(repo).structure()
    assert report.ok and sorted(n.object for n in report.notices) == ["data/ab/.tmp-abc-1111", "data/ab/.tmp-abd-2222"]
    repo.write_session().adopt_orphan_packs()  # what every backup runs at its start
    assert not old.exists() and young.exists()


def test_restore_exits_0_when_everything_the_snapshot_holds_came_back(tmp_path):
    """A file the backup could not read (vanished) has no data in the snapshot: a note, like a partial read."""
    repo = Repository.init(str(tmp_path / "repo"), "pw", kdf=FAST_KDF)
    record = malicious_snapshot(repo, [
        {"path": "kept.txt", "type": "file"},
        {"path": "gone.txt", "type": "file", "chunks": None, "content_hash": None, "status": "error",
         "error": "vanished before it could be read"},
        {"path": "partial.txt", "type": "file", "status": "error", "error": "changed while being read"},
    ])
    result = Restorer(repo, repo.files_table(record), str(tmp_path / "out")).run()
    assert result.ok and not result.failed
    assert set(result.skipped) == {"gone.txt", "partial.txt"}
    assert "not in the snapshot" in result.skipped["gone.txt"] and "vanished" in result.skipped["gone.txt"]
    assert (tmp_path / "out" / "kept.txt").read_bytes() == b"pwned" and not (tmp_path / "out" / "gone.txt").exists()


def test_check_json_on_a_damaged_config_prints_json_and_useful_advice(prefect_server, tmp_path):
    repo_url = str(tmp_path / "repo")
    Repository.init(repo_url, "pw", kdf=FAST_KDF)
    config = tmp_path / "repo" / "config"
    config.write_bytes(config.read_bytes().replace(b'"mac":"', b'"mac":"0', 1))
    env = {**os.environ, "VAULTFLOW_REPOSITORY": repo_url, "VAULTFLOW_PASSWORD": "pw",
           "PREFECT_API_URL": prefect_server}
    out = subprocess.run([sys.executable, "-m", "vaultflow", "check", "--read-data", "--json"], env=env,
                         capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert out.returncode == 1
    report = json.loads(out.stdout)
    assert report["ok"] is False and report["problems"][0]["object"] == "config"
    assert "run `vaultflow check`" not in report["problems"][0]["message"]
    assert "copy of this repository" in report["problems"][0]["message"]
