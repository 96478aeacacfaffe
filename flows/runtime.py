"""Prefect start-up for vaultflow: which Prefect API flows talk to, and the embedded local server.

Stdlib only at import time: the CLI calls `ensure_prefect_api()` before anything imports prefect,
because Prefect reads PREFECT_API_URL once, at import. See docs/startup.md for the measurements.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from vaultflow.storage.errors import VaultflowError
from vaultflow.storage.lock import pid_alive

T = TypeVar("T")

HOST = "127.0.0.1"
DEFAULT_PORT = 4290
START_TIMEOUT_SECONDS = 90.0
STOP_TIMEOUT_SECONDS = 15.0
LOG_TAIL_LINES = 30

ENV_HOME = "VAULTFLOW_HOME"
ENV_PORT = "VAULTFLOW_PREFECT_PORT"
ENV_UI = "VAULTFLOW_PREFECT_UI"
ENV_TIMINGS = "VAULTFLOW_TIMINGS"

_HAVE_PROC = os.path.exists("/proc/self/stat")  # Linux; elsewhere pids are checked with kill(pid, 0)

# The embedded server is reached on loopback only: never through an HTTP proxy from the environment.
_LOOPBACK = urllib.request.build_opener(urllib.request.ProxyHandler({}))

# Double fork through sh: the server is re-parented away from the CLI, so the CLI neither waits for it
# nor leaves a Popen object behind; `$!` is the server's own pid.
_DETACH_SCRIPT = 'log="$1"; shift; "$@" </dev/null >>"$log" 2>&1 & echo $!'


class PrefectServerError(VaultflowError):
    """The Prefect API that vaultflow needs is unreachable, or the embedded server failed to start."""


# ---------------------------------------------------------------------------------------------------
# Where things live


@dataclass(frozen=True)
class EmbeddedServer:
    """The vaultflow-owned `prefect server` (SQLite) on 127.0.0.1; its files live in its PREFECT_HOME."""

    home: Path
    port: int

    @classmethod
    def from_env(cls) -> EmbeddedServer:
        home = Path(os.environ.get(ENV_HOME) or Path.home() / ".vaultflow").expanduser()
        raw_port = os.environ.get(ENV_PORT) or str(DEFAULT_PORT)
        try:
            port = int(raw_port)
        except ValueError:
            raise PrefectServerError(f"{ENV_PORT}={raw_port!r} is not a port number; unset it or use e.g. "
                                     f"{DEFAULT_PORT}") from None
        return cls(home=home, port=port)

    @property
    def prefect_home(self) -> Path:
        return self.home / "prefect"

    @property
    def api_url(self) -> str:
        return f"http://{HOST}:{self.port}/api"

    @property
    def ui_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.prefect_home / "embedded-server.log"

    @property
    def pid_path(self) -> Path:
        return self.prefect_home / "embedded-server.pid"

    @property
    def lock_path(self) -> Path:
        return self.prefect_home / "embedded-server.lock"


@dataclass(frozen=True)
class EmbeddedServerStatus:
    """What `vaultflow server status` reports."""

    api_url: str
    prefect_home: Path
    log_path: Path
    pid: int | None
    running: bool
    healthy: bool
    external_api_url: str | None  # PREFECT_API_URL from the environment: the embedded server is not used

    def describe(self) -> str:
        if self.external_api_url:
            return f"using PREFECT_API_URL={self.external_api_url} (embedded server not used)"
        state = "healthy" if self.healthy else ("starting or unhealthy" if self.running else "stopped")
        pid = f" pid={self.pid}" if self.pid and self.running else ""
        return (f"embedded Prefect server {state}{pid} api={self.api_url} home={self.prefect_home} "
                f"log={self.log_path}")


# ---------------------------------------------------------------------------------------------------
# Public API


def ensure_prefect_api(*, verify: bool = True, timeout: float = START_TIMEOUT_SECONDS) -> str:
    """Make sure a Prefect API answers, export PREFECT_API_URL, and return it. Call before importing prefect.

    With PREFECT_API_URL in the environment that server is used (checked when `verify`). Otherwise the
    embedded server under $VAULTFLOW_HOME/prefect is reused if healthy, else started in the background;
    a file lock makes concurrent callers start at most one. The client's PREFECT_HOME defaults to the same
    directory so nothing is written to ~/.prefect behind the user's back.
    """
    external = os.environ.get("PREFECT_API_URL", "").strip()
    if external:
        if verify:
            _verify_external_api(external)
        return external
    server = EmbeddedServer.from_env()
    _ensure_embedded(server, timeout)
    os.environ["PREFECT_API_URL"] = server.api_url
    os.environ.setdefault("PREFECT_HOME", str(server.prefect_home))
    return server.api_url


def embedded_server_status() -> EmbeddedServerStatus:
    server = EmbeddedServer.from_env()
    external = os.environ.get("PREFECT_API_URL", "").strip()
    pid = _read_pid(server.pid_path)
    running = pid is not None and _is_embedded_server_process(pid)
    return EmbeddedServerStatus(
        api_url=server.api_url,
        prefect_home=server.prefect_home,
        log_path=server.log_path,
        pid=pid,
        running=running,
        healthy=_healthy(server.api_url),
        external_api_url=external if external and external != server.api_url else None,
    )


def stop_embedded_server(timeout: float = STOP_TIMEOUT_SECONDS) -> bool:
    """Stop the embedded server (SIGTERM, then SIGKILL after `timeout`). True if a server was stopped.

    Only a process recorded in our pid file and recognisable as `prefect server start` on our port is
    signalled: a server someone else started on the port is left alone.
    """
    server = EmbeddedServer.from_env()
    if not server.prefect_home.is_dir():
        return False
    with _file_lock(server.lock_path, timeout=START_TIMEOUT_SECONDS + 30):
        pid = _read_pid(server.pid_path)
        if pid is None or not _is_embedded_server_process(pid):  # whatever its port: the pid file is ours
            server.pid_path.unlink(missing_ok=True)
            return False
        _terminate(pid, timeout)
        server.pid_path.unlink(missing_ok=True)
        return True


@contextlib.contextmanager
def fast_flow_settings() -> Iterator[None]:
    """Prefect settings for a short CLI flow run; imports prefect.

    - Flow heartbeat off: each flow call otherwise waits ~1 s at exit joining the heartbeat thread
      (it sleeps in 1-s steps). Cost: no heartbeat events, so a run whose process is killed (-9, OOM)
      stays Running instead of being marked Crashed by a zombie-detection automation.
    - PREFECT_API_URL from os.environ wins over the value Prefect read at import, so a process that
      imported prefect before `ensure_prefect_api()` (tests, long-lived callers) does not silently fall
      back to an ephemeral server.
    Other settings (log-to-API, resource metrics, version check, analytics) were measured to make no
    difference; see docs/startup.md.
    """
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_CLIENT_MAX_RETRIES,
        PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
        get_current_settings,
        temporary_settings,
    )

    # The API is a witness, not the data path: when it goes away mid-run, give up on it within seconds
    # (1 retry after 2 s per request) instead of Prefect's default 5 retries per request (~5 minutes).
    current = get_current_settings()
    updates: dict[Any, Any] = {}
    if current.flows.heartbeat_frequency is not None:
        updates[PREFECT_FLOWS_HEARTBEAT_FREQUENCY] = None
    if current.client.max_retries != 1:
        updates[PREFECT_CLIENT_MAX_RETRIES] = 1
    env_url = os.environ.get("PREFECT_API_URL", "").strip()
    if env_url and current.api.url != env_url:
        updates[PREFECT_API_URL] = env_url
    if not updates:  # already in place (an agent's child): building a settings copy costs ~0.05 s
        yield
        return
    with temporary_settings(updates=updates):
        yield


def run_flow(flow_fn: Callable[..., T], /, **params: Any) -> T:
    """Call a Prefect flow under `fast_flow_settings()` and return its return value (exceptions propagate)."""
    return _timed_flow_call(flow_fn, params, FlowTimings())


def timings_requested() -> bool:
    """True when the user asked for `prefect_startup_seconds=… pipeline_seconds=…` on stderr."""
    return os.environ.get(ENV_TIMINGS, "") not in ("", "0", "false", "no")


@dataclass
class FlowTimings:
    """Where a CLI flow command's time went: Prefect start-up (server ensure, `import prefect`) vs. the flow.

    `pipeline_seconds` is the whole flow call, so it includes Prefect's per-run bookkeeping (~0.2 s).
    """

    prefect_startup_seconds: float = 0.0
    pipeline_seconds: float = 0.0

    def format(self) -> str:
        return (f"prefect_startup_seconds={self.prefect_startup_seconds:.3f} "
                f"pipeline_seconds={self.pipeline_seconds:.3f}")


@dataclass
class PrefectRuntime:
    """One CLI invocation's Prefect: the API it talks to, and where the time went.

    Usage: `rt = PrefectRuntime.start()`, then import flow modules, then `rt.run_flow(flow, **params)`.
    """

    api_url: str
    timings: FlowTimings = field(default_factory=FlowTimings)

    @classmethod
    def start(cls, *, verify: bool = True, timeout: float = START_TIMEOUT_SECONDS) -> PrefectRuntime:
        t0 = time.perf_counter()
        url = ensure_prefect_api(verify=verify, timeout=timeout)
        import prefect  # noqa: F401  # timed here on purpose: it is most of the start-up cost

        if _settings_stale():
            _reload_prefect_settings()

        with contextlib.suppress(ImportError):
            # Prefect imports this lazily inside the first flow call (parameter serialisation, ~0.07 s);
            # importing it here books it as start-up, not pipeline.
            import fastapi.encoders  # noqa: F401

        return cls(api_url=url, timings=FlowTimings(prefect_startup_seconds=time.perf_counter() - t0))

    def run_flow(self, flow_fn: Callable[..., T], /, **params: Any) -> T:
        return _timed_flow_call(flow_fn, params, self.timings)

    def api_alive(self) -> bool:
        """Whether the Prefect API answers its health check right now."""
        return _healthy(self.api_url)


# Set in an agent's child (vaultflow.agent): the Prefect environment the agent imported prefect with.
_imported_with: dict[str, str] | None = None


def prefect_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The variables Prefect reads at import: its settings and its logging configuration."""
    return {k: v for k, v in environ.items() if k.startswith("PREFECT_")}


def expected_cli_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """`environ` as a quiet (not --verbose) flow command will have it once its Prefect API is ensured: the
    agent imports prefect under it, so that its children rarely need to re-read Prefect's settings."""
    env = dict(environ)
    env.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "CRITICAL")  # what vaultflow.run._prefect sets
    if not env.get("PREFECT_API_URL", "").strip():
        server = EmbeddedServer.from_env()
        env["PREFECT_API_URL"] = server.api_url
        env.setdefault("PREFECT_HOME", str(server.prefect_home))
    return env


def prefect_imported_early(imported_with: Mapping[str, str]) -> None:
    """This process imported prefect before its command's environment was in place (an agent's child):
    `PrefectRuntime.start()` re-reads Prefect's settings and logging configuration when that environment (or a
    Prefect settings file in the working directory) differs from `imported_with`, as a fresh process would."""
    global _imported_with
    _imported_with = dict(imported_with)


def _settings_stale() -> bool:
    if _imported_with is None:
        return False
    if prefect_environment(os.environ) != _imported_with:
        return True
    # Prefect also reads settings from these files in the working directory.
    for name, marker in ((".env", b"PREFECT_"), ("prefect.toml", b""), ("pyproject.toml", b"tool.prefect")):
        with contextlib.suppress(OSError):
            if marker in Path(name).read_bytes():
                return True
    return False


def _reload_prefect_settings() -> None:
    """~0.2 s: only when the command's Prefect environment differs from the one prefect was imported with."""
    import prefect.context
    from prefect.logging.configuration import setup_logging

    prefect.context.refresh_global_settings_context()
    setup_logging(incremental=False)  # handlers bound to this command's stderr, levels from its environment


def install_fast_flow_settings() -> None:
    """Make `fast_flow_settings()` the process-global settings (an agent, whose every flow run is a CLI run), so
    each flow call does not build a settings copy (~0.05 s)."""
    import prefect.context
    from prefect.settings import PREFECT_CLIENT_MAX_RETRIES, PREFECT_FLOWS_HEARTBEAT_FREQUENCY

    root = prefect.context.GLOBAL_SETTINGS_CONTEXT
    settings = root.settings.copy_with_update(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None,
                                                       PREFECT_CLIENT_MAX_RETRIES: 1})
    prefect.context.GLOBAL_SETTINGS_CONTEXT = prefect.context.SettingsContext(profile=root.profile,
                                                                              settings=settings)


def drain_prefect(timeout: float = 10.0) -> None:
    """Send what Prefect's log and event workers still hold to the API and stop them (what interpreter exit does,
    without the rest of the teardown). Measured ~0.05 s after a flow run; see docs/startup.md."""
    if "prefect.logging.handlers" in sys.modules:
        from prefect.logging.handlers import APILogWorker

        with contextlib.suppress(Exception):
            APILogWorker.drain_all(timeout=timeout, at_exit=False)
    if "prefect.events.worker" in sys.modules:
        from prefect.events.worker import EventsWorker

        with contextlib.suppress(Exception):
            EventsWorker.drain_all(timeout=timeout, at_exit=False)


# ---------------------------------------------------------------------------------------------------
# Internals


def _timed_flow_call(flow_fn: Callable[..., T], params: dict[str, Any], timings: FlowTimings) -> T:
    t0 = time.perf_counter()
    with fast_flow_settings():
        t1 = time.perf_counter()
        timings.prefect_startup_seconds += t1 - t0  # a first-time `import prefect` lands here
        try:
            return flow_fn(**params)
        finally:
            timings.pipeline_seconds += time.perf_counter() - t1


def _ensure_embedded(server: EmbeddedServer, timeout: float) -> None:
    if _healthy(server.api_url):  # the common case: ~1 ms, no lock, no file I/O
        return
    server.prefect_home.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout
    # The lock holder may itself spend up to `timeout` starting the server.
    with _file_lock(server.lock_path, timeout=timeout + 5):
        if _healthy(server.api_url):  # another process started it while we waited for the lock
            return
        pid = _read_pid(server.pid_path)
        if pid is not None and _is_embedded_server_process(pid):
            running_port = _cmdline_port(pid)
            if running_port not in (None, server.port):
                # A second server on the same SQLite database would run every service twice.
                raise PrefectServerError(
                    f"the embedded Prefect server for {server.prefect_home} already runs on port "
                    f"{running_port} (pid {pid}), not {server.port}. Stop it with `vaultflow server stop` "
                    f"(same {ENV_HOME}), or set {ENV_PORT}={running_port}."
                )
            # Started earlier by a CLI that was interrupted before health: wait for it, don't start another.
            _wait_healthy(server, pid, deadline)
            return
        if _port_in_use(server.port):
            raise PrefectServerError(
                f"port {server.port} on {HOST} is in use, but {server.api_url}/health does not answer "
                f"`true`: it is not a healthy Prefect server. Free the port, or choose another with "
                f"{ENV_PORT}=PORT (or point PREFECT_API_URL at your own Prefect server)."
            )
        pid = _spawn(server)
        _wait_healthy(server, pid, deadline)


def _spawn(server: EmbeddedServer) -> int:
    ui = os.environ.get(ENV_UI, "1") not in ("0", "false", "no")
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", HOST, "--port", str(server.port),
           "--analytics-off", "--ui" if ui else "--no-ui"]
    env = _server_base_env(os.environ)
    env.update(
        PREFECT_HOME=str(server.prefect_home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        # `--port` alone is not enough: the UI reads its API address from these settings (/ui-settings)
        # and would otherwise send the browser to the default port 4200.
        PREFECT_SERVER_API_HOST=HOST,
        PREFECT_SERVER_API_PORT=str(server.port),
        PREFECT_UI_API_URL=server.api_url,
        PYTHONUNBUFFERED="1",
    )
    if server.log_path.exists():  # keep the previous server's log for post-mortems
        server.log_path.replace(server.log_path.with_name(server.log_path.name + ".1"))
    server.log_path.write_text(f"# vaultflow: {' '.join(cmd)}\n# PREFECT_HOME={server.prefect_home}\n")
    out = subprocess.run(
        ["/bin/sh", "-c", _DETACH_SCRIPT, "vaultflow-prefect-server", str(server.log_path), *cmd],
        env=env, cwd=server.prefect_home, stdin=subprocess.DEVNULL, capture_output=True, text=True,
        start_new_session=True, check=False,
    )
    try:
        pid = int(out.stdout.strip())
    except ValueError:
        raise PrefectServerError(f"could not start the embedded Prefect server ({' '.join(cmd)}): "
                                 f"{out.stderr.strip() or out.stdout.strip()}") from None
    tmp = server.pid_path.with_suffix(".tmp")
    tmp.write_text(f"{pid}\n")
    tmp.replace(server.pid_path)
    return pid


def _server_base_env(environ: Mapping[str, str]) -> dict[str, str]:
    """What the long-lived server inherits: no repository passwords, cloud keys or other CLI secrets."""
    keep = {"PATH", "HOME", "USER", "LOGNAME", "LANG", "TZ", "TMPDIR", "VIRTUAL_ENV"}
    drop = {"PREFECT_API_URL", "PREFECT_API_KEY", "PREFECT_HOME"}
    return {k: v for k, v in environ.items()
            if (k in keep or k.startswith(("LC_", "PYTHON", "PREFECT_"))) and k not in drop}


def _wait_healthy(server: EmbeddedServer, pid: int, deadline: float) -> None:
    while True:
        if _healthy(server.api_url):
            return
        if not pid_alive(pid):
            server.pid_path.unlink(missing_ok=True)
            raise PrefectServerError(
                f"the embedded Prefect server (pid {pid}, port {server.port}) exited before becoming "
                f"healthy. Log {server.log_path}:\n{_log_tail(server.log_path)}"
            )
        if time.monotonic() >= deadline:
            raise PrefectServerError(
                f"the embedded Prefect server (pid {pid}) is not healthy at {server.api_url}/health after "
                f"waiting; it may still be migrating a new database. See {server.log_path}; "
                f"`vaultflow server stop` stops it.\n{_log_tail(server.log_path)}"
            )
        time.sleep(0.1)


def _verify_external_api(url: str) -> None:
    health = url.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(health, timeout=10) as resp:  # a busy server is slow, not dead
            resp.read()
    except urllib.error.HTTPError as exc:
        # An answer, even 401/404 (e.g. Prefect Cloud wants a key), proves the server is there; 5xx does not.
        if exc.code < 500:
            return
        raise PrefectServerError(f"PREFECT_API_URL={url}: {health} answered HTTP {exc.code}; "
                                 f"is the Prefect server healthy?") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise PrefectServerError(
            f"PREFECT_API_URL={url} does not answer ({health}: {reason}). Start that server, fix the "
            f"URL, or unset PREFECT_API_URL to use vaultflow's embedded server."
        ) from None


def _healthy(api_url: str) -> bool:
    try:
        with _LOOPBACK.open(api_url + "/health", timeout=2) as resp:
            return bool(resp.status == 200 and resp.read().strip() == b"true")
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _port_in_use(port: int) -> bool:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1)
        return sock.connect_ex((HOST, port)) == 0


@contextlib.contextmanager
def _file_lock(path: Path, timeout: float) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise PrefectServerError(
                        f"timed out after {timeout:.0f}s waiting for {path}: another vaultflow process is "
                        f"starting or stopping the embedded Prefect server") from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)  # releases the lock


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _is_embedded_server_process(pid: int) -> bool:
    """Guards against pid reuse: only a live `python -m prefect server start` counts as our server."""
    if not pid_alive(pid):
        return False
    argv = _cmdline(pid)
    if argv is None:
        return True  # no /proc (macOS): trust the pid file
    return argv[1:4] == ["-m", "prefect", "server"]


def _cmdline_port(pid: int) -> int | None:
    argv = _cmdline(pid) or []
    with contextlib.suppress(ValueError, IndexError):
        return int(argv[argv.index("--port") + 1])
    return None


def _cmdline(pid: int) -> list[str] | None:
    """The process's argv; None where it cannot be known (no /proc)."""
    if not _HAVE_PROC:
        return None
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return raw.decode(errors="replace").split("\0")


def _terminate(pid: int, timeout: float) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if pid_alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)


def _log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
