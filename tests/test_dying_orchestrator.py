"""The orchestrator is a witness: when the Prefect API dies mid-backup, the CLI stops within 30 s with one clear
line (no tracebacks) and nothing half-committed; the repository says what was committed."""

from __future__ import annotations

import json
import signal
import time

from backup_helpers import start_cli_backup
from prefect_fixtures import free_port, start_prefect_server, wait_healthy

from vaultflow.storage.checker import Checker
from vaultflow.storage.repository import Repository


def test_a_backup_whose_api_dies_stops_promptly_and_commits_nothing_half(tmp_path):
    home = tmp_path / "prefect"
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    server = start_prefect_server(home, port)
    try:
        wait_healthy(server, api, home / "server.log")
        repo, child, _ = start_cli_backup(tmp_path, api, big_files=8)
        server.send_signal(signal.SIGKILL)  # the orchestrator dies mid-backup
        server.wait()
        killed = time.monotonic()
        out, err = child.communicate(timeout=120)
        took = time.monotonic() - killed
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    print(f"gave up {took:.1f} s after the API died; exit {child.returncode}: {err.strip().splitlines()[-1]}")
    assert took < 30, f"took {took:.1f} s to give up on a dead API:\n{err[-3000:]}"
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("vaultflow: "), err[-3000:]
    assert "Prefect API" in lines[-1] and "stopped answering" in lines[-1]
    records = Repository.open(repo.url, "pw").snapshots()
    if child.returncode == 1:
        assert "nothing was committed" in lines[-1] and not records
    else:  # the API died after the record was written: committed, complete, and said so
        assert child.returncode == 0 and "was committed" in lines[-1] and len(records) == 1
    report = Checker(Repository.open(repo.url, "pw")).structure()
    assert report.ok, [p.message for p in report.problems]
    assert not list(repo.backend.list("locks"))  # released on the way out
    assert json.dumps(out)  # stdout may be empty; it must not hold a traceback either
    assert "Traceback" not in out
