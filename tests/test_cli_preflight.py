"""What users hit first: typos are refused before a flow run exists, the password prompt comes before any
progress bar, and credentials inside a repository URL never reach flow parameters or logs."""

from __future__ import annotations

import json
import os
import pty
import select
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from vaultflow.tasks.settings import redact, split_credentials


def api(prefect_server: str, path: str, body: dict) -> object:  # type: ignore[type-arg]
    req = urllib.request.Request(f"{prefect_server}{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(req, timeout=30) as resp:
        return json.loads(resp.read())


def flow_runs(prefect_server: str) -> int:
    return int(api(prefect_server, "/flow_runs/count", {}))  # type: ignore[arg-type]


def run_cli(args: list[str], env: dict[str, str]):  # type: ignore[no-untyped-def]
    import subprocess

    return subprocess.run([sys.executable, "-m", "vaultflow", *args], env={**os.environ, **env},
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300)


def test_credentials_leave_the_url_before_anything_sees_it():
    assert split_credentials("s3://AKID:se%2Fcret@bucket/repo") == ("s3://bucket/repo",
                                                                    {"key": "AKID", "secret": "se/cret"})
    assert split_credentials("sftp://ann:pw@host/backups") == ("sftp://host/backups",
                                                               {"username": "ann", "password": "pw"})
    assert split_credentials("/srv/repo") == ("/srv/repo", {})
    assert split_credentials("s3://bucket/pre@fix") == ("s3://bucket/pre@fix", {})  # an @ in the path is not a user
    assert redact("s3://AKID:secret@bucket/repo") == "s3://***@bucket/repo"


@pytest.fixture
def cli_env(prefect_server, tmp_path) -> dict[str, str]:
    return {"VAULTFLOW_PASSWORD": "pw", "VAULTFLOW_HOME": str(tmp_path / "home"), "PREFECT_API_URL": prefect_server,
            "VAULTFLOW_REPOSITORY": str(tmp_path / "repo")}


def test_typos_are_refused_before_a_flow_run_exists(cli_env, prefect_server, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("a")
    assert run_cli(["init"], cli_env).returncode == 0
    before = flow_runs(prefect_server)
    wrong = run_cli(["backup", str(src)], {**cli_env, "VAULTFLOW_PASSWORD": "not it"})
    assert wrong.returncode == 1 and "wrong password" in wrong.stderr and "Traceback" not in wrong.stderr
    missing = run_cli(["backup", str(tmp_path / "no-such-dir")], cli_env)
    assert missing.returncode == 1 and "no such file or directory" in missing.stderr
    nowhere = run_cli(["backup", str(src)], {**cli_env, "VAULTFLOW_REPOSITORY": str(tmp_path / "typo-repo")})
    assert nowhere.returncode == 1 and "no vaultflow repository here" in nowhere.stderr
    unknown = run_cli(["restore", "nosuchsnapshot", str(tmp_path / "out")], cli_env)
    assert unknown.returncode == 1 and "matches no snapshot" in unknown.stderr
    (tmp_path / "a-file").write_text("x")
    onto_file = run_cli(["restore", "latest", str(tmp_path / "a-file")], cli_env)
    assert onto_file.returncode == 1 and "not a directory" in onto_file.stderr
    assert "Traceback" not in onto_file.stderr
    assert flow_runs(prefect_server) == before  # nobody is paged for a typo
    ok = run_cli(["backup", str(src)], cli_env)
    assert ok.returncode == 0, ok.stderr
    assert flow_runs(prefect_server) == before + 1


def test_credentials_in_a_repository_url_reach_no_flow_parameter_or_log(s3_server, prefect_server, tmp_path):
    bucket = s3_server.new_bucket()
    secret = "s3cr3t-in-the-url"
    env = {"VAULTFLOW_REPOSITORY": f"s3://AKIDINURL:{secret}@{bucket}/repo", "VAULTFLOW_PASSWORD": "pw",
           "VAULTFLOW_HOME": str(tmp_path / "home"), "PREFECT_API_URL": prefect_server,
           "VAULTFLOW_STORAGE_OPTIONS": json.dumps({"client_kwargs": {"endpoint_url": s3_server.endpoint}}),
           "AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": ""}
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("a")
    init = run_cli(["init"], env)
    assert init.returncode == 0, init.stderr
    assert secret not in init.stdout + init.stderr
    done = run_cli(["backup", str(src), "--source", "urlcreds"], env)
    assert done.returncode == 0, done.stderr
    assert secret not in done.stdout + done.stderr
    runs = api(prefect_server, "/flow_runs/filter", {"limit": 5, "sort": "EXPECTED_START_TIME_DESC"})
    assert isinstance(runs, list)
    [mine] = [r for r in runs if r["parameters"].get("repository", "").endswith(f"{bucket}/repo")]
    assert mine["parameters"]["repository"] == f"s3://{bucket}/repo"
    assert secret not in json.dumps(mine) and "AKIDINURL" not in json.dumps(mine)
    logs = api(prefect_server, "/logs/filter", {"logs": {"flow_run_id": {"any_": [mine["id"]]}}, "limit": 200})
    assert isinstance(logs, list) and logs
    assert not [entry for entry in logs if secret in entry["message"] or "AKIDINURL" in entry["message"]]


def test_the_password_prompt_comes_before_any_progress_bar(cli_env, tmp_path):
    """On a terminal without VAULTFLOW_PASSWORD the prompt used to hide behind an empty progress bar."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("a" * 100_000)
    assert run_cli(["init"], cli_env).returncode == 0
    env = {k: v for k, v in {**os.environ, **cli_env}.items() if k != "VAULTFLOW_PASSWORD"}
    pid, fd = pty.fork()
    if pid == 0:  # the child: vaultflow on a terminal
        os.execvpe(sys.executable, [sys.executable, "-m", "vaultflow", "backup", str(src)], env)
    seen = b""
    deadline = time.monotonic() + 120
    while b"password:" not in seen and time.monotonic() < deadline:
        if select.select([fd], [], [], 1)[0]:
            seen += os.read(fd, 4096)
    assert b"password:" in seen, seen
    assert "━".encode() not in seen and b"backup" not in seen.split(b"password:")[0].lower()
    os.write(fd, b"pw\n")
    out = b""
    while time.monotonic() < deadline:
        if select.select([fd], [], [], 1)[0]:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            out += chunk
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, out.decode(errors="replace")[-2000:]
    assert b"files new" in out


def test_ls_and_restore_paths_are_unaffected_by_preflight(cli_env, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("a")
    assert run_cli(["init"], cli_env).returncode == 0
    assert run_cli(["backup", str(src), "--source", "s"], cli_env).returncode == 0
    out = tmp_path / "out"
    restored = run_cli(["restore", "s:latest", str(out)], cli_env)
    assert restored.returncode == 0, restored.stderr
    assert (out / "a.txt").read_text() == "a"
    assert Path(out).is_dir()
