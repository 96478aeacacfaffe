"""A newcomer backs up a tree, restores it elsewhere, and `diff -r` finds no difference; restore-test and
check run as Prefect flows that fail loudly on damage."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest
from backup_helpers import awkward_tree
from test_cli_backup import vaultflow


@pytest.fixture
def awkward_backup(tmp_path, prefect_server) -> tuple[dict[str, str], Path]:
    """(CLI environment, source folder) after `init` and one `backup` of the awkward tree."""
    env = {"VAULTFLOW_REPOSITORY": str(tmp_path / "repo"), "VAULTFLOW_PASSWORD": "pw",
           "VAULTFLOW_HOME": str(tmp_path / "home"), "PREFECT_API_URL": prefect_server}
    src = tmp_path / "src"
    awkward_tree(src)
    vaultflow(["init"], env)
    vaultflow(["backup", str(src)], env)
    return env, src


def test_backup_then_restore_is_identical_under_diff(awkward_backup, tmp_path):
    env, src = awkward_backup
    out = tmp_path / "restored"
    restored = vaultflow(["restore", "latest", str(out)], env)
    assert "files restored and verified" in restored.stdout
    diff = subprocess.run(["diff", "-r", "--no-dereference", str(src), str(out)], capture_output=True, text=True)
    # diff cannot compare fifos and sockets by content; it names them, and nothing else may differ
    lines = [line for line in diff.stdout.splitlines() if "is a fifo while" not in line]
    assert lines == [f"Only in {src}: socket"], diff.stdout
    assert stat.S_ISFIFO(os.lstat(out / "fifo").st_mode)
    assert os.lstat(out / "docs" / "hardlink.txt").st_ino == os.lstat(out / "docs" / "readme.txt").st_ino
    link = "data/link-to-readme"
    assert os.lstat(out / link).st_mtime_ns == os.lstat(src / link).st_mtime_ns
    for rel in ("docs/readme.txt", "empty-dir", "docs"):
        s, o = os.lstat(src / rel), os.lstat(out / rel)
        assert (s.st_mode, s.st_mtime_ns) == (o.st_mode, o.st_mtime_ns), rel
    again = vaultflow(["restore", "latest", str(out)], env, check=False)
    assert again.returncode == 1 and "is not empty" in again.stderr


def test_restore_test_passes_then_fails_loudly_after_damage(awkward_backup, tmp_path):
    env, _ = awkward_backup
    ok = vaultflow(["restore-test", "--all"], env)
    assert "restore test passed: 7 files" in ok.stdout and "7 also compared byte for byte" in ok.stdout
    for dirpath, _, names in os.walk(tmp_path / "repo" / "data"):
        for name in names:
            with open(os.path.join(dirpath, name), "r+b") as f:
                f.seek(200)
                byte = f.read(1)
                f.seek(200)
                f.write(bytes([byte[0] ^ 0xFF]))
    bad = vaultflow(["restore-test", "--all"], env, check=False)
    assert bad.returncode == 1 and "restore test FAILED" in bad.stderr
    report = vaultflow(["check", "--read-data", "--json"], env, check=False)
    assert report.returncode == 1
    problems = json.loads(report.stdout)["problems"]
    assert problems and all(p["kind"] == "pack" and p["object"].startswith("data/") for p in problems)
    assert any(p["files"] for p in problems)
    assert vaultflow(["check"], env).returncode == 0  # structure alone cannot see flipped bytes inside packs
