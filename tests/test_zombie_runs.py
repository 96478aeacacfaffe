"""A killed backup does not stay Running in the UI forever: the next run that finds its lock stale marks it
Crashed (CLI runs have no heartbeat, so Prefect itself cannot notice)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

from conftest import FAST_KDF

from vaultflow.storage.lock import LockInfo
from vaultflow.storage.repository import Repository


def flow_run_state(prefect_server: str, run_id: str) -> str:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"{prefect_server}/flow_runs/{run_id}", timeout=30) as resp:
        return str(json.loads(resp.read())["state"]["type"])


def test_a_killed_backup_is_marked_crashed_by_the_next_run(prefect_server, tmp_path, monkeypatch):
    repo_url = str(tmp_path / "repo")
    repo = Repository.init(repo_url, "pw", kdf=FAST_KDF)
    src = tmp_path / "src"
    src.mkdir()
    for i in range(6):
        (src / f"big{i}.bin").write_bytes(os.urandom(40 << 20))
    env = {**os.environ, "VAULTFLOW_REPOSITORY": repo_url, "VAULTFLOW_PASSWORD": "pw",
           "PREFECT_API_URL": prefect_server, "VAULTFLOW_HOME": str(tmp_path / "home")}
    child = subprocess.Popen([sys.executable, "-m", "vaultflow", "backup", str(src), "--source", "big"], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    info = None
    while info is None and time.monotonic() < deadline and child.poll() is None:
        for name, _ in repo.backend.list("locks"):
            info = LockInfo(**json.loads(repo.backend.read(name)))
        time.sleep(0.02)
    assert info is not None and info.run, "the backup never held a lock naming its run"
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert flow_run_state(prefect_server, info.run) == "RUNNING"  # what the UI showed forever before

    monkeypatch.setenv("VAULTFLOW_PASSWORD", "pw")
    from vaultflow.flows.backup import backup
    from vaultflow.flows.runtime import run_flow

    (src / "big0.bin").write_bytes(b"small now")
    run_flow(backup, paths=[str(src)], source="big", repository=repo_url)
    assert flow_run_state(prefect_server, info.run) == "CRASHED"
