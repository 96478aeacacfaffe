"""Session fixture `prefect_server`: one real `prefect server start` (SQLite, 127.0.0.1, free port) per run.

Imported by tests/conftest.py. Works whether or not prefect was imported before the fixture runs.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

STARTUP_TIMEOUT_SECONDS = 90.0
STOP_TIMEOUT_SECONDS = 10.0

_LOOPBACK = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def api_healthy(api_url: str) -> bool:
    try:
        with _LOOPBACK.open(api_url + "/health", timeout=2) as resp:
            return bool(resp.status == 200 and resp.read().strip() == b"true")
    except (urllib.error.URLError, OSError):
        return False


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def start_prefect_server(home: Path, port: int) -> subprocess.Popen[bytes]:
    """Start `prefect server start` with its own PREFECT_HOME (and so its own SQLite DB) under `home`."""
    home.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_API_HOST="127.0.0.1",
        PREFECT_SERVER_API_PORT=str(port),
        PYTHONUNBUFFERED="1",
    )
    log = (home / "server.log").open("wb")
    with log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port),
             "--no-ui", "--analytics-off"],
            env=env, cwd=home, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        )


def wait_healthy(proc: subprocess.Popen[bytes], api_url: str, log: Path,
                 timeout: float = STARTUP_TIMEOUT_SECONDS) -> float:
    """Wait for /api/health; return the seconds it took. Fails fast if the server exits."""
    t0 = time.monotonic()
    while not api_healthy(api_url):
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited with {proc.returncode} before {api_url}/health "
                               f"answered. Log {log}:\n{log_tail(log)}")
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(f"prefect server not healthy at {api_url}/health after {timeout:.0f}s "
                               f"(pid {proc.pid}). Log {log}:\n{log_tail(log)}")
        time.sleep(0.1)
    return time.monotonic() - t0


def stop_process(proc: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT_SECONDS) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)


@contextlib.contextmanager
def _point_prefect_at(api_url: str) -> Iterator[None]:
    """PREFECT_API_URL for subprocesses and later imports (environ) and for an already imported prefect.

    Prefect reads the environment once, at import; after that only its settings context counts.
    """
    saved = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = api_url
    try:
        with contextlib.ExitStack() as stack:
            if "prefect.settings" in sys.modules:
                import prefect.context
                from prefect.settings import PREFECT_API_URL, temporary_settings

                _drain_prefect_workers()  # workers created earlier would keep talking to the old API
                stack.enter_context(temporary_settings(updates={PREFECT_API_URL: api_url}))
                # Threads started without a copied context read the process-global settings instead.
                global_ctx = getattr(prefect.context, "_temporary_global_settings_context", None)
                if global_ctx is not None:
                    stack.enter_context(global_ctx(prefect.context.get_settings_context()))
                stack.callback(_drain_prefect_workers)
            yield
    finally:
        if saved is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = saved


def _drain_prefect_workers() -> None:
    """Flush and stop Prefect's background log/event senders, so none outlives the server it talks to."""
    if "prefect.logging.handlers" in sys.modules:
        from prefect.logging.handlers import APILogWorker

        with contextlib.suppress(Exception):
            APILogWorker.drain_all(timeout=5, at_exit=False)
    if "prefect.events.worker" in sys.modules:
        from prefect.events.worker import EventsWorker

        with contextlib.suppress(Exception):
            EventsWorker.drain_all(timeout=5, at_exit=False)


@contextlib.contextmanager
def running_prefect_server(home: Path) -> Iterator[str]:
    """A real Prefect server with its own database under `home`, Prefect pointed at it while inside."""
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    proc = start_prefect_server(home, port)
    try:
        wait_healthy(proc, api_url, home / "server.log")
        with _point_prefect_at(api_url):
            yield api_url
    finally:
        _drain_prefect_workers()  # also covers a prefect first imported during the session
        stop_process(proc)


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The API URL (http://127.0.0.1:PORT/api) of a real Prefect server shared by the whole session."""
    with running_prefect_server(tmp_path_factory.mktemp("prefect-server")) as api_url:
        yield api_url
