"""The vaultflow agent: a long-lived process that has imported Prefect and the flows once, and forks a child per
flow command that the CLI hands it over a UNIX socket, so a command pays for its flow run, not for imports.

The client half (`run_command`) is stdlib only: the CLI that uses the agent never imports Prefect. The child gets
the CLI's stdin/stdout/stderr (passed as file descriptors), environment, cwd, umask and arguments, and runs the
command exactly as the CLI would; only its exit status travels back. See docs/startup.md ("The agent").
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from vaultflow import __version__

PROTOCOL = 1
ENV_AGENT = "VAULTFLOW_AGENT"  # 0/false/no: every command runs in the CLI's own process
ENV_IDLE = "VAULTFLOW_AGENT_IDLE"  # seconds without a command before the agent exits (default 120)
DEFAULT_IDLE_SECONDS = 120.0
START_TIMEOUT_SECONDS = 60.0
CHECK_EVERY_SECONDS = 2.0  # how often an idle agent checks that its code and socket are still current
COMMANDS = frozenset({"backup", "restore", "check", "restore-test"})
_MAX_MESSAGE = 1 << 20
_SUN_PATH_MAX = 100  # sockaddr_un.sun_path is 104-108 bytes; longer homes run every command directly

# Imported by the agent before it accepts commands, so that a child finds them loaded (fork shares them).
WARM_MODULES = (
    "prefect", "prefect.flow_engine", "prefect.task_engine", "prefect.artifacts", "prefect.client.orchestration",
    "prefect.events.worker", "prefect.logging.handlers", "prefect.task_runners", "prefect.blocks.system",
    "fastapi.encoders", "rich.console", "rich.progress",
    "vaultflow.flows.backup", "vaultflow.flows.restore", "vaultflow.flows.check", "vaultflow.flows.restore_test",
    "vaultflow.flows.restore_database",
    "vaultflow.flows.runtime", "vaultflow.run", "vaultflow.show", "vaultflow.cli",
)
LAZY_MODULES = (
    "prefect.utilities.visualization", "anyio._backends._asyncio", "anyio.streams.tls", "numpy.ma",
    "pyarrow.dataset", "pyarrow.acero", "pyarrow.compute", "encodings.idna", "stringprep",
    "fsspec.implementations.chained",
)


class AgentLost(Exception):
    """The child running the command ended without reporting an exit status (killed, or the agent vanished)."""

    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what


# ---------------------------------------------------------------------------------------------------
# Which agent: one per VAULTFLOW_HOME, code and import-time environment


def _key_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The variables read while modules are imported (interpreter, locale, Prefect settings, the flows' thread
    pool size): an agent serves only commands whose values equal its own. PREFECT_API_URL/KEY are re-read per
    command, so they do not count; secrets never enter the agent's environment."""
    keep = {"LANG", "VAULTFLOW_WORKERS", "VAULTFLOW_HOME", "VAULTFLOW_PREFECT_PORT"}
    skip = {"PREFECT_API_URL", "PREFECT_API_KEY"}
    return {k: v for k, v in environ.items()
            if (k in keep or k.startswith(("LC_", "PYTHON", "PREFECT_"))) and k not in skip}


def _code_files() -> Iterator[str]:
    import importlib.util

    for pkg in ("vaultflow", "vaultflow.storage", "vaultflow.tasks", "vaultflow.tasks.sources", "vaultflow.flows",
                "vaultflow.deployments"):
        with contextlib.suppress(ImportError, ValueError):
            spec = importlib.util.find_spec(pkg)
            for where in (spec.submodule_search_locations or []) if spec else []:
                with contextlib.suppress(OSError):
                    for entry in os.scandir(where):
                        if entry.name.endswith(".py"):
                            yield entry.path
    import site

    yield from site.getsitepackages()  # its mtime changes whenever a package is installed, upgraded or removed


def agent_key(environ: Mapping[str, str]) -> str:
    """Identifies an agent that may run this command: protocol, vaultflow version, its code files (an upgrade or
    an edit retires old agents), the interpreter and the import-time environment."""
    h = hashlib.sha256(f"{PROTOCOL}\0{__version__}\0{sys.executable}\0{sys.version}\0".encode())
    h.update(json.dumps(sorted(_key_environment(environ).items())).encode())
    for path in sorted(_code_files()):
        with contextlib.suppress(OSError):
            st = os.stat(path)
            h.update(f"{path}\0{st.st_mtime_ns}\0{st.st_size}\0".encode())
    return h.hexdigest()[:16]


def home_dir(environ: Mapping[str, str]) -> Path:
    return Path(environ.get("VAULTFLOW_HOME") or Path.home() / ".vaultflow").expanduser()


def socket_path(home: Path, key: str) -> Path:
    return home / f"agent-{key}.sock"


# ---------------------------------------------------------------------------------------------------
# Client: the CLI


def cli_process() -> bool:
    """Whether this process is the `vaultflow` command itself (its console script or `python -m vaultflow`) with
    its own standard streams, not a library caller of `main()` such as a test."""
    argv0 = sys.argv[0] if sys.argv else ""
    own_main = os.path.join(os.path.dirname(os.path.abspath(__file__)), "__main__.py")
    if os.path.basename(argv0) != "vaultflow" and os.path.abspath(argv0) != own_main:
        return False
    return sys.stdin is sys.__stdin__ and sys.stdout is sys.__stdout__ and sys.stderr is sys.__stderr__


def enabled() -> bool:
    """Whether this process should hand flow commands to the agent: only the CLI process itself, before it
    imported Prefect, and not when VAULTFLOW_AGENT=0."""
    if os.environ.get(ENV_AGENT, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if not hasattr(socket, "send_fds") or not hasattr(os, "fork") or "prefect" in sys.modules:
        return False
    if not cli_process():
        return False
    try:
        for fd in (0, 1, 2):
            os.fstat(fd)
    except OSError:
        return False
    return True


def run_command(args: argparse.Namespace, prepare: Callable[[], None] | None = None) -> int | None:
    """Run a parsed flow command in an agent child; its exit status, or None when no agent can take it (the
    caller then runs the command itself). `prepare` runs once the agent is reachable, before the command is
    handed over (e.g. the password prompt). Raises AgentLost when the child ended without an exit status."""
    if args.command not in COMMANDS or not enabled():
        return None
    home = home_dir(os.environ)
    key = agent_key(os.environ)
    path = socket_path(home, key)
    if len(os.fsencode(path)) > _SUN_PATH_MAX:
        return None
    try:
        sock = _connect_or_start(home, key, path)
    except OSError as e:
        _log(home, f"agent unusable, running directly: {e}")
        return None
    if sock is None:
        return None
    with sock:
        try:
            socket.send_fds(sock, [_frame({"op": "run", "protocol": PROTOCOL, "key": key})], [0, 1, 2])
            hello = _recv(sock)
        except (OSError, ValueError) as e:
            _log(home, f"agent did not take the command, running directly: {e}")
            return None
        if hello.get("error") or not hello.get("pid"):
            _log(home, f"agent refused the command, running directly: {hello.get('error')}")
            return None
        if prepare is not None:
            prepare()  # may prompt; an interrupt here reaches the child as EOF before it ran anything
        return _drive(sock, int(hello["pid"]), args)


def _drive(sock: socket.socket, pid: int, args: argparse.Namespace) -> int:
    request = {"command": args.command, "args": {k: v for k, v in vars(args).items() if k != "func"},
               "argv": sys.argv, "env": dict(os.environ), "cwd": os.getcwd(), "umask": _umask()}
    forwarded = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)

    received: set[int] = set()

    def forward(signum: int, _frame: object) -> None:
        received.add(signum)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)

    def stop(signum: int, _frame: object) -> None:  # Ctrl-Z: stop the run, then ourselves; SIGCONT resumes both
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGSTOP)
        os.kill(os.getpid(), signal.SIGSTOP)

    def cont(signum: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)

    # A signal this process ignores (SIGINT for a background job of a script) stays ignored, as it would be
    # for the command run here.
    handlers = {s: forward for s in forwarded} | {signal.SIGTSTP: stop, signal.SIGCONT: cont}
    saved = {s: signal.signal(s, h) for s, h in handlers.items() if signal.getsignal(s) is not signal.SIG_IGN}
    try:
        sock.sendall(_frame(request))
        while True:
            try:
                msg = _recv(sock)
            except InterruptedError:
                continue
            except (OSError, ValueError):
                raise AgentLost(f"the vaultflow agent's process running this {args.command} (pid {pid}) ended "
                                "without an exit status") from None
            if "exit" in msg:
                _remember_usage(msg)
                return int(msg["exit"])
            if "died" in msg:
                if msg.get("signal") in received:  # the signal we were sent ended the run: it ends us too
                    for sig, handler in saved.items():
                        signal.signal(sig, handler)
                    signal.signal(int(msg["signal"]), signal.SIG_DFL)
                    os.kill(os.getpid(), int(msg["signal"]))
                raise AgentLost(f"the vaultflow agent's process running this {args.command} (pid {pid}) was "
                                f"{msg['died']}")
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)


_last_usage: dict[str, float] = {}


def _remember_usage(msg: Mapping[str, Any]) -> None:
    _last_usage.clear()
    _last_usage.update({k: float(v) for k, v in msg.items() if k in ("cpu_seconds", "max_rss_kb")})


def last_usage() -> dict[str, float]:
    """CPU seconds and peak RSS of the agent child that ran the last command (it is not in the CLI's tree)."""
    return dict(_last_usage)


def _connect_or_start(home: Path, key: str, path: Path) -> socket.socket | None:
    sock = _try_connect(path)
    if sock is not None:
        return sock
    home.mkdir(parents=True, exist_ok=True)
    with _flock(home / f"agent-{key}.lock"):
        sock = _try_connect(path)  # another CLI started it while we waited
        if sock is not None:
            return sock
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # a stale socket: its agent is gone (connect was refused)
        pid = _spawn(home, key)
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            sock = _try_connect(path)
            if sock is not None:
                return sock
            if not _alive(pid):
                _log(home, f"agent pid {pid} exited before listening; running directly")
                return None
            time.sleep(0.02)
        _log(home, f"agent pid {pid} not listening after {START_TIMEOUT_SECONDS:.0f}s; running directly")
        return None


def _try_connect(path: Path) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(os.fspath(path))
    except OSError:
        sock.close()
        return None
    return sock


def _spawn(home: Path, key: str) -> int:
    env = {k: v for k, v in os.environ.items()
           if k in ("PATH", "HOME", "USER", "LOGNAME", "TZ", "TMPDIR", "VIRTUAL_ENV", ENV_IDLE)}
    env.update(_key_environment(os.environ))
    env["VAULTFLOW_HOME"] = str(home)
    log = home / "agent.log"
    cmd = [sys.executable, "-m", "vaultflow.agent", key]
    script = 'log="$1"; shift; "$@" </dev/null >>"$log" 2>&1 & echo $!'  # detached, re-parented away from us
    out = subprocess.run(["/bin/sh", "-c", script, "vaultflow-agent", str(log), *cmd], env=env, cwd=home,
                         stdin=subprocess.DEVNULL, capture_output=True, text=True, start_new_session=True,
                         check=False)
    return int(out.stdout.strip())


# ---------------------------------------------------------------------------------------------------
# Server: the agent process


def serve(key: str) -> int:
    """The agent's main loop: import once, listen on the socket, fork a child per command; exit when idle,
    when the code or environment no longer matches `key`, or when the socket is taken away."""
    home = home_dir(os.environ)
    started_env = dict(os.environ)  # the key's environment; os.environ gains Prefect's below
    if agent_key(started_env) != key:
        _log(home, "agent: code or environment changed while starting; exiting")
        return 1
    t0 = time.perf_counter()
    import importlib

    from vaultflow.flows import runtime

    os.environ.update(runtime.expected_cli_environment(os.environ))  # before prefect reads it, at import
    imported_with = runtime.prefect_environment(os.environ)
    for name in WARM_MODULES:
        importlib.import_module(name)
    for name in LAZY_MODULES:  # what a command imports on first use, measured in a child
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    runtime.install_fast_flow_settings()
    import gc

    gc.collect()
    gc.freeze()  # children share these pages; the collector must not touch (copy) them
    idle = float(os.environ.get(ENV_IDLE) or DEFAULT_IDLE_SECONDS)
    path = socket_path(home, key)
    old = os.umask(0o177)  # the socket is 0600 from the moment it exists
    try:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        listener.bind(os.fspath(path))
    finally:
        os.umask(old)
    listener.listen(64)
    ino = path.stat().st_ino
    _log(home, f"agent {key} pid {os.getpid()} ready in {time.perf_counter() - t0:.2f}s on {path}")
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    children: dict[int, socket.socket] = {}
    last_used = time.monotonic()
    next_check = time.monotonic() + CHECK_EVERY_SECONDS
    accepting = True
    while accepting or children:
        watch = [wake_r] + ([listener] if accepting else [])
        ready, _, _ = select.select(watch, [], [], CHECK_EVERY_SECONDS)
        if wake_r in ready:
            with contextlib.suppress(BlockingIOError):
                os.read(wake_r, 512)
        _reap(children)
        if accepting and listener in ready:
            with contextlib.suppress(OSError):
                conn, _ = listener.accept()
                last_used = time.monotonic()
                pid = _accept(conn, key, listener, children, (wake_r, wake_w), imported_with)
                if pid:
                    children[pid] = conn
                else:
                    conn.close()
        now = time.monotonic()
        if accepting and now >= next_check:
            next_check = now + CHECK_EVERY_SECONDS
            reason = None
            if not children and now - last_used > idle:
                reason = f"idle for {idle:.0f}s"
            elif not _same_inode(path, ino):
                reason = "its socket was removed or replaced"
            elif agent_key(started_env) != key:
                reason = "vaultflow's code or Python packages changed"
            if reason:
                accepting = False
                listener.close()
                if _same_inode(path, ino):
                    path.unlink()
                _log(home, f"agent {key} pid {os.getpid()} exits: {reason}")
    return 0


def _same_inode(path: Path, ino: int) -> bool:
    try:
        return path.stat().st_ino == ino
    except OSError:
        return False


def _reap(children: dict[int, socket.socket]) -> None:
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        conn = children.pop(pid, None)
        if conn is None:
            continue
        if os.WIFSIGNALED(status):  # a child that finished normally reported its exit status itself
            sig = os.WTERMSIG(status)
            with contextlib.suppress(OSError):
                conn.sendall(_frame({"died": f"killed by signal {sig} ({signal.Signals(sig).name})", "signal": sig}))
        conn.close()


def _accept(conn: socket.socket, key: str, listener: socket.socket, children: Mapping[int, socket.socket],
            wake: tuple[int, int], imported_with: Mapping[str, str]) -> int:
    conn.settimeout(5)
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _, uid, _ = struct.unpack("3i", creds)
    if uid != os.getuid():
        return 0
    data, fds, _, _ = socket.recv_fds(conn, 4096, 3)
    try:
        hello = _decode(data)
        if hello.get("protocol") != PROTOCOL or hello.get("key") != key or len(fds) != 3:
            with contextlib.suppress(OSError):
                conn.sendall(_frame({"error": f"agent {key} (protocol {PROTOCOL}) does not serve this CLI"}))
            return 0
        pid = os.fork()
        if pid == 0:
            code = 70
            try:
                listener.close()
                for other in children.values():
                    other.close()
                signal.set_wakeup_fd(-1)
                for fd in wake:
                    os.close(fd)
                code = _child(conn, fds, imported_with)
            finally:
                os._exit(code)
        return pid
    finally:
        for fd in fds:
            os.close(fd)


# ---------------------------------------------------------------------------------------------------
# Child: one command


def _child(conn: socket.socket, fds: list[int], imported_with: Mapping[str, str]) -> int:
    for sig in (signal.SIGCHLD, signal.SIGHUP, signal.SIGTERM, signal.SIGQUIT, signal.SIGTSTP, signal.SIGUSR1,
                signal.SIGUSR2):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
    conn.settimeout(None)
    conn.sendall(_frame({"pid": os.getpid()}))
    try:
        req = _recv(conn)
    except (OSError, ValueError):
        return 70  # the CLI went away before handing over the command
    os.environ.clear()
    os.environ.update(req["env"])
    os.chdir(req["cwd"])
    os.umask(int(req["umask"]))
    sys.argv = list(req["argv"])
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, OSError, ValueError):
            stream.reconfigure(line_buffering=stream is sys.stderr or os.isatty(stream.fileno()))  # type: ignore[union-attr]
    done = threading.Event()
    threading.Thread(target=_watch_cli, args=(conn, done), daemon=True, name="vaultflow-agent-cli").start()
    from vaultflow.flows import runtime

    runtime.prefect_imported_early(imported_with)  # settings follow this command's environment, not the agent's
    rc = _run_parsed(req["command"], req["args"])
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    runtime.drain_prefect()  # logs and events reach the API before the CLI returns
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    done.set()
    with contextlib.suppress(OSError):
        conn.sendall(_frame({"exit": rc, "cpu_seconds": usage.ru_utime + usage.ru_stime + kids.ru_utime
                             + kids.ru_stime, "max_rss_kb": max(usage.ru_maxrss, kids.ru_maxrss)}))
    return rc


def _watch_cli(conn: socket.socket, done: threading.Event) -> None:
    """The CLI was killed hard (SIGKILL, OOM; catchable signals are forwarded): so is the run, as if it were the
    CLI's own process. Its lock goes stale; the next run marks its flow run Crashed."""
    with contextlib.suppress(OSError):
        while conn.recv(4096):
            pass
    if not done.is_set():
        os.kill(os.getpid(), signal.SIGKILL)


def _run_parsed(command: str, values: Mapping[str, Any]) -> int:
    """What `vaultflow.cli.main` does after parsing, for a command parsed by the CLI."""
    from vaultflow import run
    from vaultflow.storage.errors import VaultflowError

    funcs = {"backup": run.cmd_backup, "restore": run.cmd_restore, "check": run.cmd_check,
             "restore-test": run.cmd_restore_test}
    args = argparse.Namespace(**values, func=funcs[command])
    try:
        return int(funcs[command](args))
    except VaultflowError as e:
        from vaultflow.show import safe

        text = "\n".join(safe(line) for line in str(e).split("\n"))
        print(f"vaultflow: error: {text}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("vaultflow: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        sys.stderr.close()
        return 0
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1


# ---------------------------------------------------------------------------------------------------
# Wire format: 4-byte length, then JSON


def _frame(obj: Mapping[str, Any]) -> bytes:
    data = json.dumps(obj).encode()
    return struct.pack("!I", len(data)) + data


def _decode(data: bytes) -> dict[str, Any]:
    if len(data) < 4:
        raise ValueError("short message")
    (n,) = struct.unpack("!I", data[:4])
    if n != len(data) - 4:
        raise ValueError("message length mismatch")
    obj = json.loads(data[4:])
    if not isinstance(obj, dict):
        raise ValueError("not a message")
    return obj


def _recv(sock: socket.socket) -> dict[str, Any]:
    head = _recv_exact(sock, 4)
    (n,) = struct.unpack("!I", head)
    if n > _MAX_MESSAGE:
        raise ValueError("message too large")
    return _decode(head + _recv_exact(sock, n))


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("connection closed")
        buf += chunk
    return buf


# ---------------------------------------------------------------------------------------------------
# Small helpers


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _alive(pid: int) -> bool:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        return fields[0] != "Z"
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


@contextlib.contextmanager
def _flock(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _log(home: Path, line: str) -> None:
    with contextlib.suppress(OSError):
        home.mkdir(parents=True, exist_ok=True)
        with open(home / "agent.log", "a") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")


if __name__ == "__main__":
    sys.exit(serve(sys.argv[1]))
