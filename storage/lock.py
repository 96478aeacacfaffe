"""Repository locks: shared for writers (backup), exclusive for prune; stale locks expire.

A lock is a small object `locks/<random id>` holding host, pid and the time it was last refreshed.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType

from .backend import Backend
from .errors import RepositoryLocked

STALE_AFTER = 30 * 60.0  # seconds without a refresh after which a lock no longer counts
REFRESH_EVERY = 5 * 60.0


@dataclass(frozen=True)
class LockInfo:
    exclusive: bool
    host: str
    pid: int
    created: float
    refreshed: float
    purpose: str
    scope: str = ""  # two locks with the same non-empty scope conflict (one backup per source at a time)


def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs on this host; a zombie (exited, not yet reaped) counts as gone."""
    try:
        # PID 1 in containers often does not reap orphans: a dead process lingers as a zombie.
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rpartition(")")[2].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
    except OSError:  # no /proc here: ask the kernel
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_stale(info: LockInfo, now: float, stale_after: float = STALE_AFTER) -> bool:
    if now - info.refreshed > stale_after:
        return True
    return info.host == socket.gethostname() and not pid_alive(info.pid)


class Lock:
    """A held lock; a background thread refreshes it until release (use as a context manager)."""

    def __init__(self, backend: Backend, exclusive: bool, purpose: str, stale_after: float = STALE_AFTER,
                 scope: str = "") -> None:
        self.backend = backend
        self.exclusive = exclusive
        self.purpose = purpose
        self.scope = scope
        self.stale_after = stale_after
        self.name = f"locks/{secrets.token_hex(16)}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._created = time.time()

    def _info(self) -> LockInfo:
        return LockInfo(self.exclusive, socket.gethostname(), os.getpid(), self._created, time.time(), self.purpose,
                        self.scope)

    def _conflicts(self) -> list[tuple[str, LockInfo]]:
        now, found = time.time(), []
        for name, _ in self.backend.list("locks"):
            if name == self.name:
                continue
            try:
                info = LockInfo(**json.loads(self.backend.read(name)))
            except Exception:  # a lock being written or deleted right now: not ours to judge
                continue
            if is_stale(info, now, self.stale_after):
                self.backend.delete(name)
                continue
            if self.exclusive or info.exclusive or (self.scope and info.scope == self.scope):
                found.append((name, info))
        return found

    def acquire(self) -> Lock:
        conflicts = self._conflicts()
        if not conflicts:
            self.backend.replace(self.name, json.dumps(asdict(self._info())).encode())
            conflicts = self._conflicts()  # someone may have locked at the same moment
            if conflicts:
                self.backend.delete(self.name)
        if conflicts:
            name, info = conflicts[0]
            kind = "an exclusive" if info.exclusive else "a shared"
            raise RepositoryLocked(
                f"{self.backend.url} is locked: {kind} lock {name} for {info.purpose!r}"
                f"{f' ({info.scope})' if info.scope else ''} held by pid {info.pid} on "
                f"{info.host}, refreshed {time.time() - info.refreshed:.0f} s ago; it expires after "
                f"{self.stale_after:.0f} s without refresh; if that process is gone, delete {name} from the "
                "repository")
        self._thread = threading.Thread(target=self._refresh_loop, name="vaultflow-lock-refresh", daemon=True)
        self._thread.start()
        return self

    def _refresh_loop(self) -> None:
        interval = min(REFRESH_EVERY, self.stale_after / 3)
        while not self._stop.wait(interval):
            self.backend.replace(self.name, json.dumps(asdict(self._info())).encode())

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.backend.delete(self.name)

    def __enter__(self) -> Lock:
        return self.acquire()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.release()
