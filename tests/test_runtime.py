"""vaultflow.flows.runtime against real Prefect servers: the embedded server's life cycle, and flow runs.

The embedded-server tests share one server (module fixture) and run CLI-like work in subprocesses, as the
CLI does; only the `prefect_server` test runs a flow inside pytest.
"""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from prefect_fixtures import free_port

from vaultflow.flows import runtime


@dataclass(frozen=True)
class Embedded:
    home: Path
    port: int

    @property
    def env(self) -> dict[str, str]:
        """A CLI process's environment: no Prefect API configured, so the embedded default applies."""
        env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_HOME")}
        env.update(VAULTFLOW_HOME=str(self.home), VAULTFLOW_PREFECT_PORT=str(self.port))
        return env

    @property
    def server(self) -> runtime.EmbeddedServer:
        return runtime.EmbeddedServer(self.home, self.port)

    def use(self, monkeypatch: pytest.MonkeyPatch) -> None:
        for key, value in self.env.items():
            monkeypatch.setenv(key, value)
        monkeypatch.delenv("PREFECT_API_URL", raising=False)
        monkeypatch.delenv("PREFECT_HOME", raising=False)


def server_processes(port: int) -> list[int]:
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        argv = proc.info["cmdline"] or []
        if proc.info["status"] != psutil.STATUS_ZOMBIE and "server" in argv and str(port) in argv:
            found.append(proc.pid)
    return found


def run_script(code: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(proc: subprocess.Popen[str], timeout: float = 120) -> dict:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-4000:]
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Embedded]:
    emb = Embedded(tmp_path_factory.mktemp("vaultflow-home"), free_port())
    try:
        yield emb
    finally:
        pid = runtime._read_pid(emb.server.pid_path)
        if pid is not None and runtime._is_embedded_server_process(pid):
            runtime._terminate(pid, 10)  # a failed test must not leave the server behind


ENSURE = """
    import json, time
    t = time.perf_counter()
    from vaultflow.flows import runtime
    url = runtime.ensure_prefect_api()
    pid = runtime._read_pid(runtime.EmbeddedServer.from_env().pid_path)
    print(json.dumps({"url": url, "pid": pid, "seconds": time.perf_counter() - t}))
"""


def test_runtime_module_does_not_import_prefect() -> None:
    code = "import sys, vaultflow.flows.runtime; print(sorted(m for m in sys.modules if 'prefect' in m))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_two_concurrent_first_calls_start_exactly_one_server(embedded: Embedded) -> None:
    env = {**embedded.env, "VAULTFLOW_PASSWORD": "hunter2-not-for-the-server"}
    procs = [run_script(ENSURE, env) for _ in range(2)]
    a, b = (finish(p) for p in procs)
    assert a["url"] == b["url"] == f"http://127.0.0.1:{embedded.port}/api"
    assert a["pid"] == b["pid"] is not None
    assert server_processes(embedded.port) == [a["pid"]]
    # Each start rotates the log; a second start would have left embedded-server.log.1 behind.
    assert not (embedded.home / "prefect" / "embedded-server.log.1").exists()
    assert (embedded.home / "prefect" / "prefect.db").exists()  # SQLite in vaultflow's home
    # The long-lived server does not keep the CLI's secrets in its environment.
    assert "VAULTFLOW_PASSWORD" not in psutil.Process(a["pid"]).environ()


def test_a_second_call_reuses_the_running_server_quickly(embedded: Embedded,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    embedded.use(monkeypatch)
    pid_before = runtime._read_pid(embedded.server.pid_path)
    t = time.perf_counter()
    url = runtime.ensure_prefect_api()
    elapsed = time.perf_counter() - t
    assert url == embedded.server.api_url and elapsed < 0.5
    assert runtime._read_pid(embedded.server.pid_path) == pid_before
    assert os.environ["PREFECT_API_URL"] == url
    assert os.environ["PREFECT_HOME"] == str(embedded.home / "prefect")
    # The UI is served and sends the browser to this port, not Prefect's default 4200.
    with urllib.request.urlopen(f"http://127.0.0.1:{embedded.port}/ui-settings", timeout=5) as resp:
        assert json.load(resp)["api_url"] == url


def test_a_cli_flow_run_completes_and_is_readable_through_the_prefect_client(embedded: Embedded) -> None:
    code = """
        import json
        from vaultflow.flows.runtime import PrefectRuntime
        rt = PrefectRuntime.start()
        from prefect import flow, task
        from prefect.client.orchestration import get_client
        from prefect.runtime import flow_run

        @task
        def add(a: int, b: int) -> int:
            return a + b

        @flow
        def tiny(a: int, b: int) -> dict:
            return {"sum": add(a, b), "id": str(flow_run.id)}

        out = rt.run_flow(tiny, a=2, b=3)
        with get_client(sync_client=True) as client:
            fr = client.read_flow_run(out["id"])
        print(json.dumps({**out, "state": fr.state.type.value, "api": rt.api_url,
                          "startup": rt.timings.prefect_startup_seconds,
                          "pipeline": rt.timings.pipeline_seconds, "line": rt.timings.format()}))
    """
    out = finish(run_script(code, embedded.env))
    assert out["sum"] == 5 and out["state"] == "COMPLETED"
    assert out["api"] == embedded.server.api_url
    assert out["startup"] > 0 and out["pipeline"] > 0
    assert out["line"].startswith("prefect_startup_seconds=") and " pipeline_seconds=" in out["line"]
    # The run is in the embedded server's database, not in some ephemeral server's.
    with urllib.request.urlopen(f"{embedded.server.api_url}/flow_runs/{out['id']}", timeout=5) as resp:
        assert json.load(resp)["state_type"] == "COMPLETED"


def test_stop_ends_the_server_and_status_reports_it(embedded: Embedded,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    embedded.use(monkeypatch)
    before = runtime.embedded_server_status()
    assert before.healthy and before.running and before.pid is not None
    assert "healthy" in before.describe()

    assert runtime.stop_embedded_server() is True
    assert not psutil.pid_exists(before.pid) or psutil.Process(before.pid).status() == psutil.STATUS_ZOMBIE
    after = runtime.embedded_server_status()
    assert not after.healthy and not after.running and "stopped" in after.describe()
    assert runtime.stop_embedded_server() is False


def test_a_start_interrupted_before_health_is_adopted_not_duplicated(embedded: Embedded,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    pid_path = embedded.server.pid_path
    assert not pid_path.exists()  # stopped by the previous test
    first = run_script(ENSURE, embedded.env)
    deadline = time.monotonic() + 30
    while not pid_path.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    first.kill()  # Ctrl-C'd CLI: the server it spawned is still booting (that takes seconds)
    first.communicate()
    spawned = runtime._read_pid(pid_path)
    assert spawned is not None and not runtime._healthy(embedded.server.api_url)

    out = finish(run_script(ENSURE, embedded.env))
    assert out["pid"] == spawned and server_processes(embedded.port) == [spawned]

    # Same home, another port: refused, since two servers would share one SQLite database.
    Embedded(embedded.home, free_port()).use(monkeypatch)
    with pytest.raises(runtime.PrefectServerError, match=f"already runs on port {embedded.port}"):
        runtime.ensure_prefect_api()
    assert runtime.stop_embedded_server() is True  # the pid file's server, whatever the configured port
    assert server_processes(embedded.port) == []


def test_an_unreachable_prefect_api_url_is_named_in_the_error(monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"http://127.0.0.1:{free_port()}/api"
    monkeypatch.setenv("PREFECT_API_URL", url)
    with pytest.raises(runtime.PrefectServerError, match=url.replace(".", r"\.")):
        runtime.ensure_prefect_api()


def test_a_port_taken_by_something_else_is_reported_not_fought_over(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    squatter = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)  # answers 501
    threading.Thread(target=squatter.serve_forever, daemon=True).start()
    try:
        Embedded(tmp_path, squatter.server_address[1]).use(monkeypatch)
        with pytest.raises(runtime.PrefectServerError, match="VAULTFLOW_PREFECT_PORT"):
            runtime.ensure_prefect_api()
        assert not (tmp_path / "prefect" / "embedded-server.pid").exists()
    finally:
        squatter.shutdown()
        squatter.server_close()


def test_a_flow_on_the_session_server_writes_a_table_artifact(prefect_server: str) -> None:
    from prefect import flow
    from prefect.artifacts import create_table_artifact
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
    from prefect.runtime import flow_run

    @flow
    def summarise(files: int) -> str:
        create_table_artifact(key="runtime-test-summary", table=[{"path": "/etc", "files": files}])
        return str(flow_run.id)

    flow_run_id = runtime.run_flow(summarise, files=4)
    with get_client(sync_client=True) as client:
        assert client.api_url.port == int(prefect_server.rsplit(":", 1)[1].split("/")[0])
        assert client.read_flow_run(flow_run_id).state.type.value == "COMPLETED"
        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    [art] = [a for a in arts if a.key == "runtime-test-summary"]
    assert art.type == "table"
    data = json.loads(art.data) if isinstance(art.data, str) else art.data
    assert data == [{"path": "/etc", "files": 4}]
