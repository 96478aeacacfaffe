"""A killed backup does not stay Running in the UI forever: the next run that finds its lock stale marks it
Crashed (CLI runs have no heartbeat, so Prefect itself cannot notice)."""

from __future__ import annotations

import json
import os
import signal
import urllib.request

from backup_helpers import start_cli_backup


def flow_run_state(prefect_server: str, run_id: str) -> str:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"{prefect_server}/flow_runs/{run_id}", timeout=30) as resp:
        return str(json.loads(resp.read())["state"]["type"])


def test_a_killed_backup_is_marked_crashed_by_the_next_run(prefect_server, tmp_path, monkeypatch):
    repo, child, info = start_cli_backup(tmp_path, prefect_server)
    assert info.run, "the backup's lock does not name its run"
    os.kill(child.pid, signal.SIGKILL)
    child.communicate()
    assert flow_run_state(prefect_server, info.run) == "RUNNING"  # what the UI showed forever before

    monkeypatch.setenv("VAULTFLOW_PASSWORD", "pw")
    from vaultflow.flows.backup import backup
    from vaultflow.flows.runtime import run_flow

    src = tmp_path / "src"
    (src / "big0.bin").write_bytes(b"small now")
    run_flow(backup, paths=[str(src)], source="big", repository=repo.url)
    assert flow_run_state(prefect_server, info.run) == "CRASHED"
