"""`vaultflow backup`, `snapshots`, `ls`, `stats` as a newcomer runs them, each backup a Prefect flow run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

DROP = "-dac_override,-dac_read_search"


def vaultflow(args: list[str], env: dict[str, str], *, check: bool = True, unprivileged: bool = False,
              timeout: float = 300) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "vaultflow", *args]
    if unprivileged and os.geteuid() == 0:  # root reads every file; drop the capabilities that allow it
        cmd = ["setpriv", f"--inh-caps={DROP}", f"--bounding-set={DROP}", *cmd]
    proc = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture
def env(location, prefect_server, tmp_path) -> dict[str, str]:
    e = {"VAULTFLOW_REPOSITORY": location.url, "VAULTFLOW_PASSWORD": "pw", "VAULTFLOW_HOME": str(tmp_path / "home"),
         "PREFECT_API_URL": prefect_server}
    if location.storage_options:
        e["VAULTFLOW_STORAGE_OPTIONS"] = json.dumps(location.storage_options)
    return e


def tree(root: Path) -> Path:
    for i in range(20):
        (root / f"dir{i % 3}").mkdir(parents=True, exist_ok=True)
        (root / f"dir{i % 3}" / f"file{i}.txt").write_text(f"line {i}\n" * (i * 100 + 1))
    return root


def test_init_backup_snapshots_ls_and_stats(env, tmp_path):
    src = tree(tmp_path / "src")
    vaultflow(["init"], env)
    first = vaultflow(["backup", str(src), "--source", "docs"], env)
    assert "files new / changed / unchanged / errored: 20 / 0 / 0 / 0" in first.stdout
    time.sleep(0.01)
    (src / "dir0" / "file0.txt").write_text("changed\n")
    second = vaultflow(["backup", str(src), "--source", "docs"], env)
    assert "0 / 1 / 19 / 0" in second.stdout
    snaps = json.loads(vaultflow(["snapshots", "--json"], env).stdout)
    assert [(s["source"], s["serial"]) for s in snaps] == [("docs", 1), ("docs", 2)]
    assert snaps[1]["previous"] == snaps[0]["id"]
    listing = vaultflow(["ls", "docs:2", "dir0", "-l"], env).stdout.splitlines()
    assert any(line.endswith(" dir0/file0.txt") and " 8 " in line for line in listing)
    assert vaultflow(["ls", snaps[0]["id"][:8]], env).stdout.count("\n") == 23  # 20 files + 3 dirs
    stats = json.loads(vaultflow(["stats", "--json"], env).stdout)
    assert stats["snapshots"] == 2 and stats["packs"] >= 1 and stats["chunks"] >= 20


def test_unknown_snapshot_and_wrong_password_are_clean_errors(env, tmp_path):
    vaultflow(["init"], env)
    missing = vaultflow(["ls", "nope:1"], env, check=False)
    assert missing.returncode == 1 and "matches no snapshot" in missing.stderr
    wrong = vaultflow(["backup", str(tree(tmp_path / "s"))], {**env, "VAULTFLOW_PASSWORD": "bad"}, check=False)
    assert wrong.returncode != 0 and "wrong password" in wrong.stderr


def test_error_budget_fails_the_run_but_keeps_the_readable_files(tmp_path, prefect_server):
    env = {"VAULTFLOW_REPOSITORY": str(tmp_path / "repo"), "VAULTFLOW_PASSWORD": "pw",
           "VAULTFLOW_HOME": str(tmp_path / "home"), "PREFECT_API_URL": prefect_server}
    src = tree(tmp_path / "src")
    (src / "secret").write_text("no")
    os.chmod(src / "secret", 0)
    vaultflow(["init"], env)
    within = vaultflow(["backup", str(src), "--source", "s"], env, check=False, unprivileged=True)
    assert within.returncode == 3, within.stderr  # committed, but incomplete: like restic's exit 3
    over = vaultflow(["backup", str(src), "--source", "s", "--error-budget", "0"], env, check=False,
                     unprivileged=True)
    assert over.returncode == 3 and "more than the error budget of 0" in over.stderr
    listing = vaultflow(["ls", "s:2", "-l"], env).stdout
    assert "secret  [permission denied]" in listing and "dir1/file1.txt" in listing
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=1)
    assert runs[0].state is not None and runs[0].state.is_failed()  # so Prefect's notifications fire
