"""Runs one command and measures it: wall time, user+sys CPU, peak RSS of the process tree, exit status.

Method: the child is started in its own session and reaped with os.wait4, whose rusage covers the child and
every descendant it waited for (CPU = ru_utime + ru_stime). A psutil poller sums RSS over the live process tree
every 50 ms; its maximum is the reported peak tree RSS (an upper bound where forked processes share pages; a
process living under 50 ms can be missed). The largest single process is the highest VmHWM the poller saw, or
rusage's ru_maxrss when that exceeds the runner's own VmHWM: Linux carries the spawning process's high-water
mark across fork+exec into ru_maxrss, so below that floor it says nothing about the child. Output goes to files,
not pipes, so a daemon that inherits them cannot stall the run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

POLL_SECONDS = 0.05
TAIL_CHARS = 2000


@dataclass(frozen=True)
class Run:
    """The outcome of one command."""

    argv: list[str]
    returncode: int
    wall_s: float
    cpu_s: float
    peak_tree_rss: int
    max_process_rss: int
    stdout: str
    stderr: str
    timed_out: bool = False
    ok_codes: frozenset[int] = field(default=frozenset({0}))

    @property
    def ok(self) -> bool:
        return not self.timed_out and self.returncode in self.ok_codes

    def error(self) -> str:
        """A one-paragraph reason for failure: exit status plus the tail of stderr (or stdout)."""
        why = "timed out" if self.timed_out else f"exit status {self.returncode}"
        tail = (self.stderr.strip() or self.stdout.strip())[-TAIL_CHARS:]
        return f"`{' '.join(self.argv)}` {why}: {tail}"


def _hwm(pid: int | str) -> int | None:
    """VmHWM (peak RSS since exec) of a live process from /proc, in bytes; None where /proc has none."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


class _TreeRssPoller(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.peak = 0
        self.max_hwm = 0
        self._stop_event = threading.Event()
        try:
            self._root: psutil.Process | None = psutil.Process(pid)
        except psutil.Error:
            self._root = None

    def sample(self) -> None:
        if self._root is None:
            return
        total = 0
        try:
            procs = [self._root, *self._root.children(recursive=True)]
        except psutil.Error:
            return
        for p in procs:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
            self.max_hwm = max(self.max_hwm, _hwm(p.pid) or 0)
        self.peak = max(self.peak, total)

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.sample()
            self._stop_event.wait(POLL_SECONDS)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def run(argv: list[str], env: dict[str, str], cwd: Path | None = None, timeout: float | None = None,
        ok_codes: frozenset[int] = frozenset({0})) -> Run:
    """Run `argv` to completion (or kill its process group after `timeout` seconds) and measure it."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        try:
            proc = subprocess.Popen(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    start_new_session=True)
        except OSError as e:
            return Run(argv, 127, 0.0, 0.0, 0, 0, "", str(e), ok_codes=ok_codes)
        floor = _hwm("self")  # ≥ what exec carried into the child's ru_maxrss (a high-water mark only grows)
        poller = _TreeRssPoller(proc.pid)
        poller.sample()
        poller.start()
        timer = _Killer(proc.pid, timeout)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        timer.cancel()
        poller.stop()
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, so Popen must not wait again
        ru_maxrss = usage.ru_maxrss * 1024
        max_process = ru_maxrss if floor is None else max(poller.max_hwm, ru_maxrss if ru_maxrss > floor else 0)
        out.seek(0)
        err.seek(0)
        return Run(
            argv=argv,
            returncode=proc.returncode,
            wall_s=wall,
            cpu_s=usage.ru_utime + usage.ru_stime,
            peak_tree_rss=poller.peak,
            max_process_rss=max_process,
            stdout=out.read().decode(errors="replace")[-20 * TAIL_CHARS:],
            stderr=err.read().decode(errors="replace")[-20 * TAIL_CHARS:],
            timed_out=timer.fired,
            ok_codes=ok_codes,
        )


class _Killer:
    """Kills the child's process group (it runs in its own session) if it outlives `timeout`."""

    def __init__(self, pid: int, timeout: float | None) -> None:
        self.fired = False
        self._pid = pid
        self._timer = threading.Timer(timeout, self._kill) if timeout else None
        if self._timer:
            self._timer.daemon = True
            self._timer.start()

    def _kill(self) -> None:
        self.fired = True
        try:
            os.killpg(self._pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def cancel(self) -> None:
        if self._timer:
            self._timer.cancel()
