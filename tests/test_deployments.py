"""`vaultflow serve`: the config file, the deployments it registers, and the alarms (a failed run, a source past
its RPO) reaching a real webhook receiver, all against a real Prefect server and a served backup."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import FAST_KDF

from vaultflow.deployments import config
from vaultflow.storage.errors import VaultflowError
from vaultflow.storage.repository import Repository

EXAMPLE = Path(__file__).parent.parent / "deployments" / "example.toml"
BASE = '[repository]\nurl = "/r"\n[[sources]]\nname = "a"\npaths = ["/a"]\nevery = "1h"\n'


class Receiver(http.server.ThreadingHTTPServer):
    """A webhook target on 127.0.0.1 that keeps every JSON message with the time it arrived."""

    def __init__(self) -> None:
        self.messages: list[tuple[float, dict[str, Any]]] = []
        super().__init__(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}/hook"
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def wait_for(self, what: str, since: float, timeout: float) -> dict[str, Any]:
        deadline = time.time() + timeout
        while time.time() < deadline:
            for at, m in list(self.messages):
                if at >= since and what in m["subject"]:
                    return m
            time.sleep(0.2)
        raise AssertionError(f"no message {what!r} within {timeout:.0f} s; got {[m for _, m in self.messages]}")


class Handler(http.server.BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["content-length"]))
        self.server.messages.append((time.time(), {**json.loads(body), "auth": self.headers["authorization"]}))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A server of this module's own: serve's automations (a proactive RPO alarm per source, a trigger that marks
    runs without heartbeats Crashed) must not act on the other tests' runs, and its scheduler must be fresh."""
    from prefect_fixtures import running_prefect_server

    with running_prefect_server(tmp_path_factory.mktemp("prefect-deployments")) as api_url:
        yield api_url


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    try:
        yield r
    finally:
        r.shutdown()
        r.server_close()


HOOK = """
[[notify.webhooks]]
name = "test"
url = "{url}"
headers = {{ Authorization = "Bearer {{{{token}}}}" }}
token_env = "VF_TEST_HOOK_TOKEN"
"""


def example_for(repo: str, tree: Path, hook: str) -> Path:
    """The example config with a temporary repository, local sources and the receiver as its only webhook."""
    text = EXAMPLE.read_text().split("[[notify.webhooks]]")[0]
    for old, new in (('"/srv/backups/vaultflow"', json.dumps(repo)), ('password_secret = "vaultflow-main"', ""),
                     ('["/srv/docs", "/srv/wiki"]', json.dumps([str(tree)])),
                     ('["postgresql://backup@db.internal/app"]', '["command[app.sql]:echo dump"]')):
        assert old in text
        text = text.replace(old, new)
    path = tree.parent / "serve.toml"
    path.write_text(text + HOOK.format(url=hook))
    return path


def test_the_example_config_is_valid_and_rotation_covers_every_slice():
    cfg = config.load(EXAMPLE)
    assert [s.name for s in cfg.sources] == ["docs", "appdb"] and cfg.repository.password_secret == "vaultflow-main"
    assert cfg.verify is not None and cfg.retention is not None and len(cfg.notify.webhooks) == 2
    slices = cfg.verify.subset_schedules()
    assert [k for k, _, _ in slices] == [f"{k}/7" for k in range(1, 8)]
    # the K of the run at anchor + j days is j mod 7 + 1: day j belongs to exactly one slice's schedule
    for j in range(30):
        t = cfg.verify.anchor + timedelta(days=j)
        owners = [k for k, first, period in slices if (t - first) % period == timedelta(0)]
        assert owners == [f"{j % 7 + 1}/7"]
    from vaultflow.tasks.audit import parse_duration  # the audit flow receives the RPOs unchanged

    for text in ("26h", "1d12h", "90m", "1w", "45", "2.5h", "30s"):
        assert config.seconds(text) == parse_duration(text)


@pytest.mark.parametrize("text, message", [
    ('[repository]\nurl = "/r"\npassword = "hunter2"\n', "repository.password: secrets never go in the config"),
    ('[repository]\nurl = "s3://KEY:SECRET@bucket/r"\n[[sources]]\nname = "a"\npaths = ["/a"]\nevery = "1h"\n',
     "repository.url: the repository URL holds credentials"),
    (BASE + '[[notify.webhooks]]\nname = "x"\nurl = "http://h"\ntoken = "abc"\n', "notify.webhooks.0.token: secrets"),
    ('[repository]\nurl = "/r"\n[[sources]]\nname = "a"\npaths = ["/a"]\n', "sources.0: give exactly one of cron"),
    (BASE.replace('every = "1h"', 'every = "1h"\ncron = "0 * * * *"'), "give exactly one of cron"),
    (BASE + 'rpo = "soon"\n', "sources.0.rpo: duration 'soon'"),
    (BASE + 'rpo = "5s"\n', "at least 10s"),
    (BASE + '[[sources]]\nname = "a"\npaths = ["/b"]\ncron = "0 * * * *"\n', "source names repeat: ['a']"),
    (BASE + '[retention]\ncron = "0 1 * * *"\n', "retention: no keep rule"),
    (BASE + '[retention]\ncron = "0 1 * * *"\nkeep_last = 2\ngrace = "soon"\n', "retention.grace: duration 'soon'"),
    (BASE.replace('name = "a"', 'name = "a/b"'), "sources.0.name: "),
    (BASE + 'exclud = []\n', "sources.0.exclud: Extra inputs are not permitted"),
    (BASE + '[[notify.webhooks]]\nname = "On-call"\nurl = "http://h"\n', "webhooks.0.name: 'On-call': use lowercase"),
    ('[repository\n', "not valid TOML"),
])
def test_typos_and_secrets_in_the_config_are_refused_naming_the_key(text, message):
    with pytest.raises(VaultflowError, match="^cfg: ") as e:
        config.parse(text, "cfg")
    assert message in str(e.value)
    assert "hunter2" not in str(e.value) and "SECRET" not in str(e.value)


@pytest.mark.parametrize("schedule, message", [
    ('cron = "61 * * * *"', "source a: Invalid cron string"),
    ('cron = "0 * * * *"\ntimezone = "Mars/Olympus"', "source a: .*Mars/Olympus"),
])
def test_a_schedule_prefect_refuses_is_refused_before_serving(schedule, message):
    from vaultflow.deployments import serve

    with pytest.raises(VaultflowError, match=message):
        serve.build(config.parse(BASE.replace('every = "1h"', schedule)), "0" * 32)


def test_a_token_placeholder_in_a_payload_is_not_a_secret():
    cfg = config.parse(BASE + '[[notify.webhooks]]\nname = "ops"\nurl = "http://h/{{token}}"\n'
                       'payload = { text = "{{body}}", token = "{{token}}" }\ntoken_env = "T"\n')
    assert cfg.notify.webhooks[0].name == "ops"


def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VAULTFLOW_PASSWORD", "pw")
    monkeypatch.setenv("VF_TEST_HOOK_TOKEN", "t0ken")
    monkeypatch.setenv("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "CRITICAL")


def test_serve_registers_the_deployments_alarms_and_limit_once(prefect_server, tmp_path, monkeypatch, capsys):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterDeploymentId

    from vaultflow.serve import main as serve

    _env(monkeypatch)
    repo = Repository.init(str(tmp_path / "repo"), "pw", kdf=FAST_KDF)
    (tmp_path / "docs").mkdir()
    path = example_for(repo.url, tmp_path / "docs", "http://127.0.0.1:9/hook")
    for _ in range(2):  # a second serve updates in place: nothing is duplicated
        assert serve([str(path), "--register-only"]) == 0
    out = capsys.readouterr().out
    assert "registered backup/docs" in out and "retention runs one at a time" in out
    with get_client(sync_client=True) as client:
        deps = {f"{client.read_flow(d.flow_id).name}/{d.name}": d for d in client.read_deployments()
                if "repository:main" in d.tags}
        assert sorted(deps) == ["audit/main", "backup/appdb", "backup/docs", "check/main", "restore-test/main",
                                "retention/main"]
        docs = deps["backup/docs"]
        assert docs.tags == ["vaultflow", "repository:main", "source:docs"]
        assert [s.schedule.cron for s in docs.schedules] == ["0 * * * *"]  # type: ignore[union-attr]
        assert deps["backup/appdb"].schedules[0].schedule.interval == timedelta(hours=6)  # type: ignore[union-attr]
        assert docs.parameters["source"] == "docs" and docs.parameters["repository"] == repo.url
        assert "pw" not in json.dumps(docs.parameters) and docs.parameters["password_secret"] is None
        assert {"paths", "source", "error_budget", "task_runner"} <= set(docs.parameter_openapi_schema["properties"])
        check = deps["check/main"]
        assert sorted(s.parameters["read_data_subset"] for s in check.schedules) == [f"{k}/7" for k in range(1, 8)]
        assert deps["retention/main"].parameters["policy"]["keep_daily"] == 7
        assert deps["audit/main"].parameters["rpo"] == {"docs": "3h", "appdb": "13h"}
        deadline = time.monotonic() + 150  # the scheduler service loops every 60 s; a loaded machine is slower
        while True:  # the server schedules runs on creation: seven consecutive checks read every slice once
            runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                deployment_id=FlowRunFilterDeploymentId(any_=[check.id])))
            first = sorted(runs, key=lambda r: r.expected_start_time)[:7]  # type: ignore[arg-type, return-value]
            if len(first) == 7 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert sorted(r.parameters["read_data_subset"] for r in first) == [f"{k}/7" for k in range(1, 8)]
        limit = client.read_global_concurrency_limit_by_name(f"vaultflow-retention-{repo.config.id}")
        assert limit.limit == 1
        autos = [a for a in client.read_automations() if a.name.startswith(("vaultflow/main: ", "vaultflow: "))]
    assert sorted(a.name for a in autos) == ["vaultflow/main: appdb past RPO", "vaultflow/main: docs past RPO",
                                             "vaultflow/main: run failed", "vaultflow: runs whose heartbeat stopped"]
    stale = next(a for a in autos if a.name == "vaultflow/main: docs past RPO")
    assert stale.trigger.within == timedelta(hours=3) and stale.trigger.posture == "Proactive"  # type: ignore[union-attr]
    zombie = next(a for a in autos if a.name.endswith("heartbeat stopped"))
    assert zombie.actions[0].type == "change-flow-run-state" and zombie.actions[0].state == "CRASHED"  # type: ignore[union-attr]

    # a source renamed in the config: the old name's alarm goes; a wrong password or an unset token stops serve
    path.write_text(path.read_text().replace('name = "appdb"', 'name = "app"'))
    assert serve([str(path), "--register-only"]) == 0
    with get_client(sync_client=True) as client:
        names = {a.name for a in client.read_automations()}
    assert "vaultflow/main: app past RPO" in names and "vaultflow/main: appdb past RPO" not in names
    capsys.readouterr()
    monkeypatch.setenv("VAULTFLOW_PASSWORD", "wrong")
    assert serve([str(path), "--register-only"]) == 1 and "password" in capsys.readouterr().err
    monkeypatch.setenv("VAULTFLOW_PASSWORD", "pw")
    monkeypatch.delenv("VF_TEST_HOOK_TOKEN")
    assert serve([str(path), "--register-only"]) == 1
    assert "webhook test: token_env VF_TEST_HOOK_TOKEN is not set in serve's environment" in capsys.readouterr().err
    assert serve([str(path), "--repo", "/elsewhere"]) == 1 and "drop --repo" in capsys.readouterr().err
    other = Repository.init(str(tmp_path / "other"), "pw", kdf=FAST_KDF)  # same names, another repository
    path.write_text(path.read_text().replace(json.dumps(repo.url), json.dumps(other.url)))
    assert serve([str(path), "--register-only"]) == 1
    assert f"deployment backup/docs already serves repository {repo.url}: rename" in capsys.readouterr().err


def test_a_served_backup_runs_and_failures_and_stale_sources_reach_the_webhook(prefect_server, tmp_path,
                                                                              monkeypatch, receiver):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
    from prefect.deployments import run_deployment

    from vaultflow.flows.backup import backup
    from vaultflow.flows.runtime import run_flow

    _env(monkeypatch)
    repo = Repository.init(str(tmp_path / "repo"), "pw", kdf=FAST_KDF)
    tree = tmp_path / "docs"
    tree.mkdir()
    (tree / "a.txt").write_text("hello\n" * 1000)
    path = tmp_path / "serve.toml"  # one source that runs only when triggered, and a 20 s RPO
    path.write_text(f'[repository]\nurl = "{repo.url}"\nname = "served"\n[[sources]]\nname = "files"\n'
                    f'paths = ["{tree}"]\ncron = "0 3 1 1 *"\nrpo = "20s"\n' + HOOK.format(url=receiver.url))
    log = (tmp_path / "serve.log").open("wb")
    serving = subprocess.Popen(
        [sys.executable, "-c", "import sys; from vaultflow.serve import main; sys.exit(main(sys.argv[1:]))",
         str(path)], env={**os.environ, "PREFECT_API_URL": prefect_server}, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        with get_client(sync_client=True) as client:
            while not [d for d in client.read_deployments() if d.name == "files"]:
                assert serving.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
                time.sleep(0.5)
        ran = run_deployment("backup/files", timeout=120)
        committed = time.time()
        assert ran.state is not None and ran.state.is_completed(), (ran.state, (tmp_path / "serve.log").read_text())
        assert ran.name.startswith("backup/files#")  # with_options(flow_run_name=…) survives Runner.add_flow
        with get_client(sync_client=True) as client:
            arts = client.read_artifacts(artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[ran.id])))
        assert {"backup-summary", "backup-report", f"commit-{repo.config.id}-files"} <= {a.key for a in arts}
        assert [r.source for r in Repository.open(repo.url, "pw").snapshots().values()] == ["files"]

        # a CLI-style run (no tags, no deployment) that fails: the message names flow, source, error and link
        started = time.time()
        with pytest.raises(VaultflowError, match="exited with status 3"):
            run_flow(backup, paths=["command:sh -c 'exit 3'"], source="broken", repository=repo.url)
        failed = receiver.wait_for("backup Failed", started, timeout=30)
        assert failed["auth"] == "Bearer t0ken"
        body = failed["body"]
        assert body.startswith("backup run ") and " ended Failed\n" in body and "source: broken\n" in body
        assert "error: Flow run encountered an exception: SourceError: stream stdin (command sh): sh exited with " \
               "status 3" in body
        link = body.split("run: ")[1].split()[0]
        assert link.startswith(prefect_server.removesuffix("/api") + "/runs/flow-run/")
        with get_client(sync_client=True) as client:
            assert client.read_flow_run(link.rsplit("/", 1)[1]).flow_id == client.read_flow_run(ran.id).flow_id

        # dead man's switch: nothing committed for 20 s after the served backup (fixed windows: 1–3 later)
        late = receiver.wait_for("source files past its RPO", committed, timeout=75)
        assert "repository served" in late["body"]
        assert not [m for _, m in receiver.messages if "broken" in m["subject"] and "RPO" in m["subject"]]
    finally:
        serving.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            serving.wait(30)
        serving.kill() if serving.poll() is None else None
        log.close()
    assert serving.returncode == 0  # SIGTERM: in-flight runs cancelled, schedules paused, a clean exit


def test_retention_forgets_then_prunes_under_the_repository_limit(prefect_server, tmp_path, monkeypatch):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId
    from prefect.concurrency.sync import concurrency

    from vaultflow.deployments.serve import ensure_retention_limit, retention
    from vaultflow.flows.backup import backup
    from vaultflow.flows.runtime import run_flow

    _env(monkeypatch)
    repo = Repository.init(str(tmp_path / "repo"), "pw", kdf=FAST_KDF)
    tree = tmp_path / "t"
    tree.mkdir()
    for i in range(3):
        (tree / f"{i}.bin").write_bytes(os.urandom(50_000))
        run_flow(backup, paths=[str(tree)], source="t", repository=repo.url)
    limit = ensure_retention_limit(repo.config.id)
    args = {"policy": {"keep_last": 1}, "limit": limit, "grace": "0s", "repository": repo.url, "label": "main"}
    with concurrency(limit, occupy=1, strict=True):  # another retention of this repository holds the limit
        with pytest.raises(TimeoutError):  # Prefect's AcquireConcurrencySlotTimeoutError
            run_flow(retention, **args, lock_wait=2)
    assert len(Repository.open(repo.url, "pw").snapshots()) == 3  # nothing was forgotten meanwhile
    state = run_flow(retention, **args, return_state=True)
    assert state.is_completed()
    assert [r.serial for r in Repository.open(repo.url, "pw").snapshots().values()] == [3]
    with get_client(sync_client=True) as client:
        children = client.read_flow_runs(flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(
            any_=[state.state_details.flow_run_id])))
    assert sorted(r.name.split("#")[0] for r in children) == ["forget/main", "prune/main"]
    from prefect.concurrency._asyncio import ConcurrencySlotAcquisitionError

    with pytest.raises(ConcurrencySlotAcquisitionError, match="vaultflow-retention-none"):
        run_flow(retention, **{**args, "limit": "vaultflow-retention-none"})  # strict: never unguarded
