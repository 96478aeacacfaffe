"""The vaultflow agent: a CLI flow command handed to a warm process prints and exits exactly as it would have run
in the CLI's own process, and a run that dies, a CLI that dies, a stale socket and two commands at once are
each handled (see docs/startup.md, "The agent")."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from backup_helpers import start_cli_backup
from conftest import FAST_KDF

from vaultflow import agent
from vaultflow.storage.lock import pid_alive
from vaultflow.storage.repository import Repository


def run_cli(args: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vaultflow", *args], env={**os.environ, **env},
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=timeout)


def make_env(tmp_path: Path, prefect_server: str, repo: str, **extra: str) -> dict[str, str]:
    return {"VAULTFLOW_PASSWORD": "pw", "VAULTFLOW_HOME": str(tmp_path / "home"), "PREFECT_API_URL": prefect_server,
            "VAULTFLOW_REPOSITORY": repo, "VAULTFLOW_AGENT_IDLE": "20", **extra}


def agent_pids(home: Path) -> list[int]:
    log = home / "agent.log"
    text = log.read_text() if log.exists() else ""
    return [int(p) for p in re.findall(r"pid (\d+) ready", text)]


def stop_agents(home: Path) -> None:
    for pid in agent_pids(home):
        if pid_alive(pid):
            os.kill(pid, signal.SIGTERM)


def source(tmp_path: Path, name: str = "src", files: int = 40) -> Path:
    src = tmp_path / name
    src.mkdir()
    for i in range(files):
        (src / f"f{i}.txt").write_text(f"file {i}\n" * (i + 1))
    return src


def completed_backup_runs(prefect_server: str) -> int:
    body = {"flows": {"name": {"any_": ["backup"]}}, "flow_runs": {"state": {"type": {"any_": ["COMPLETED"]}}}}
    req = urllib.request.Request(f"{prefect_server}/flow_runs/count", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(req, timeout=30) as resp:
        return int(json.loads(resp.read()))


def normalised(text: str) -> str:
    """A backup summary without what differs between two runs: ids, durations and speeds."""
    text = re.sub(r"\([0-9a-f]{12}\)", "(ID)", text)
    text = re.sub(r"duration: .*", "duration: T", text)
    return re.sub(r"throughput \(read\): .*", "throughput (read): R", text)


def test_a_backup_through_the_agent_prints_and_exits_as_a_direct_one_and_is_a_flow_run(prefect_server, tmp_path):
    src = source(tmp_path)
    repos = {mode: str(tmp_path / f"repo-{mode}") for mode in ("agent", "direct")}
    for url in repos.values():
        Repository.init(url, "pw", kdf=FAST_KDF)
    home = tmp_path / "home"
    before = completed_backup_runs(prefect_server)
    try:
        via = run_cli(["backup", str(src), "--source", "s"], make_env(tmp_path, prefect_server, repos["agent"]))
        direct = run_cli(["backup", str(src), "--source", "s"],
                         make_env(tmp_path, prefect_server, repos["direct"], VAULTFLOW_AGENT="0"))
        assert via.returncode == direct.returncode == 0, via.stderr + direct.stderr
        assert normalised(via.stdout) == normalised(direct.stdout)
        assert via.stderr == direct.stderr == ""
        assert len(agent_pids(home)) == 1, "the agent did not run the command"
        sockets = list(home.glob("agent-*.sock"))
        assert len(sockets) == 1 and stat.S_IMODE(sockets[0].stat().st_mode) == 0o600

        # The second command reuses the agent; a failing one exits as the direct CLI does.
        again = run_cli(["backup", str(tmp_path / "missing")], make_env(tmp_path, prefect_server, repos["agent"]))
        missing = run_cli(["backup", str(tmp_path / "missing")],
                          make_env(tmp_path, prefect_server, repos["agent"], VAULTFLOW_AGENT="0"))
        assert (again.returncode, again.stdout, again.stderr) == (missing.returncode, missing.stdout, missing.stderr)
        assert again.returncode == 1 and "no such file or directory" in again.stderr
        assert len(agent_pids(home)) == 1
        assert completed_backup_runs(prefect_server) == before + 2  # both are real flow runs in the API
        for url in repos.values():
            assert len(Repository.open(url, "pw").snapshots()) == 1
    finally:
        stop_agents(home)


def test_a_run_killed_inside_the_agent_is_reported_in_one_line_and_the_repository_decides(prefect_server,
                                                                                          tmp_path, monkeypatch):
    monkeypatch.setenv("VAULTFLOW_AGENT_IDLE", "20")
    repo, child, info = start_cli_backup(tmp_path, prefect_server)
    try:
        assert info.pid != child.pid, "the backup did not run in an agent's child"
        os.kill(info.pid, signal.SIGKILL)
        _, err = child.communicate(timeout=120)
        assert child.returncode == 1
        lines = err.strip().splitlines()
        assert len(lines) == 1, err
        assert lines[0].startswith("vaultflow: error: the vaultflow agent's process running this backup")
        assert "killed by signal 9 (SIGKILL); nothing was committed" in lines[0]
        assert repo.snapshots() == {}
    finally:
        child.kill()
        stop_agents(tmp_path / "home")


def test_a_cli_killed_hard_takes_its_run_in_the_agent_with_it(prefect_server, tmp_path, monkeypatch):
    monkeypatch.setenv("VAULTFLOW_AGENT_IDLE", "20")
    repo, child, info = start_cli_backup(tmp_path, prefect_server)
    try:
        assert info.pid != child.pid and pid_alive(info.pid)
        os.kill(child.pid, signal.SIGKILL)
        child.communicate()
        deadline = time.monotonic() + 10
        while pid_alive(info.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not pid_alive(info.pid), "the run went on without its CLI"
        assert repo.snapshots() == {}
    finally:
        child.kill()
        stop_agents(tmp_path / "home")


def test_a_stale_socket_is_replaced(prefect_server, tmp_path):
    src = source(tmp_path)
    url = str(tmp_path / "repo")
    Repository.init(url, "pw", kdf=FAST_KDF)
    env = make_env(tmp_path, prefect_server, url)
    home = tmp_path / "home"
    home.mkdir()
    path = agent.socket_path(home, agent.agent_key({**os.environ, **env}))
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))  # a socket file nobody listens on: what an agent killed with -9 leaves behind
    dead.close()
    stale = path.stat().st_ino
    try:
        out = run_cli(["backup", str(src)], env)
        assert out.returncode == 0, out.stderr
        assert len(agent_pids(home)) == 1
        assert path.stat().st_ino != stale
    finally:
        stop_agents(home)


def test_two_commands_at_once_run_side_by_side_in_one_agent(prefect_server, tmp_path):
    url = str(tmp_path / "repo")
    Repository.init(url, "pw", kdf=FAST_KDF)
    env = make_env(tmp_path, prefect_server, url)
    home = tmp_path / "home"
    sources = [source(tmp_path, f"src{i}") for i in range(2)]
    results: list[subprocess.CompletedProcess[str]] = []
    try:
        threads = [threading.Thread(target=lambda s=s: results.append(run_cli(["backup", str(s)], env)))
                   for s in sources]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [r.returncode for r in results] == [0, 0], [r.stderr for r in results]
        assert len(agent_pids(home)) == 1, "two agents were started"
        assert len(Repository.open(url, "pw").snapshots()) == 2
    finally:
        stop_agents(home)


def test_vaultflow_agent_0_runs_the_command_in_the_cli_process(prefect_server, tmp_path):
    src = source(tmp_path)
    url = str(tmp_path / "repo")
    Repository.init(url, "pw", kdf=FAST_KDF)
    out = run_cli(["backup", str(src)], make_env(tmp_path, prefect_server, url, VAULTFLOW_AGENT="0"))
    assert out.returncode == 0, out.stderr
    assert not list((tmp_path / "home").glob("agent-*"))


def test_an_agent_serves_only_its_code_and_import_time_environment():
    env = {"HOME": "/home/ann", "VAULTFLOW_HOME": "/tmp/h", "PREFECT_API_URL": "http://a/api"}
    key = agent.agent_key(env)
    assert agent.agent_key({**env, "PREFECT_API_URL": "http://b/api"}) == key  # re-read per command
    assert agent.agent_key({**env, "VAULTFLOW_PASSWORD": "secret"}) == key  # never part of the agent
    assert agent.agent_key({**env, "VAULTFLOW_WORKERS": "3"}) != key  # read when the flows are imported
    assert agent.agent_key({**env, "PYTHONPATH": "/elsewhere"}) != key
    assert agent.agent_key({**env, "PREFECT_LOGGING_LEVEL": "DEBUG"}) != key
