"""Repository locks: shared for writers (backup), exclusive for prune; stale locks expire; holders prove theirs.

A lock is a small object `locks/<random id>` holding who holds it (host, boot, PID namespace, PID and its start
time) and when it was last refreshed. A holder that lost its lock finds out before it commits (`verify`).
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import threading
import time
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from types import TracebackType

from .backend import Backend
from .errors import LockLost, ObjectMissing, RepositoryLocked

STALE_AFTER = 30 * 60.0  # seconds without a refresh after which a lock no longer counts
REFRESH_EVERY = 5 * 60.0
_RETRY_FIRST = 1.0  # a failed refresh is retried after 1 s, then 2, 4, … up to the refresh interval


@dataclass(frozen=True)
class LockInfo:
    exclusive: bool
    host: str
    pid: int
    created: float
    refreshed: float
    purpose: str
    scope: str = ""  # two locks with the same non-empty scope conflict (one backup per source at a time)
    boot_id: str = ""  # the kernel boot of the holder's host: a PID means nothing across boots
    pid_ns: int = 0  # the holder's PID namespace: containers sharing one hostname have different ones
    pid_start: int = 0  # the holder process's start time (clock ticks since boot): guards against PID reuse
    token: str = ""  # random per lock, so a holder recognises its own object
    run: str = ""  # the orchestrator's id of the run holding it: a stale lock names a run that died


@dataclass(frozen=True)
class HostIdentity:
    """What makes a PID meaningful: the same host name, kernel boot and PID namespace."""

    host: str
    boot_id: str
    pid_ns: int


@lru_cache(maxsize=1)
def this_host() -> HostIdentity:
    try:
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot_id = ""
    try:
        pid_ns = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        pid_ns = 0
    return HostIdentity(socket.gethostname(), boot_id, pid_ns)


def process_start(pid: int) -> int | None:
    """Start time of `pid` in clock ticks since boot; None when it is not running (zombies count as gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    if fields[0] in ("Z", "X"):  # PID 1 in containers often does not reap orphans
        return None
    return int(fields[19])


def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs on this host (in our PID namespace); a zombie counts as gone."""
    if Path("/proc/self/stat").exists():
        return process_start(pid) is not None
    try:  # no /proc here: ask the kernel
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_stale(info: LockInfo, now: float, stale_after: float = STALE_AFTER,
             here: HostIdentity | None = None) -> bool:
    """A lock is stale when not refreshed for `stale_after`, or when it provably belongs to a dead process:
    same host name, same kernel boot and same PID namespace as ours, and its PID is gone (or reused)."""
    if now - info.refreshed > stale_after:
        return True
    here = here or this_host()
    if not (info.boot_id and info.pid_ns and here.boot_id and here.pid_ns):
        return False  # nothing proves that its PID is one we can see
    if (info.host, info.boot_id, info.pid_ns) != (here.host, here.boot_id, here.pid_ns):
        return False
    started = process_start(info.pid)
    return started is None or (info.pid_start != 0 and started != info.pid_start)


class Lock:
    """A held lock; a background thread refreshes it until release (use as a context manager).

    A failed refresh is retried with backoff; a refresh that finds its object gone or replaced marks the lock
    lost. `verify()` is the fencing check a holder runs immediately before it commits.
    """

    def __init__(self, backend: Backend, exclusive: bool, purpose: str, stale_after: float = STALE_AFTER,
                 scope: str = "", run: str = "") -> None:
        self.backend = backend
        self.exclusive = exclusive
        self.purpose = purpose
        self.scope = scope
        self.stale_after = stale_after
        self.name = f"locks/{secrets.token_hex(16)}"
        self._token = secrets.token_hex(16)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._created = time.time()
        self._last_ok = time.monotonic()  # when this holder last knew its lock object was in place
        self._lost: str | None = None
        self.refresh_failures = 0
        self.run = run
        self.removed: list[LockInfo] = []  # stale locks this locker removed: their holders died or stalled

    def _info(self) -> LockInfo:
        here = this_host()
        return LockInfo(self.exclusive, here.host, os.getpid(), self._created, time.time(), self.purpose,
                        self.scope, here.boot_id, here.pid_ns, process_start(os.getpid()) or 0, self._token,
                        self.run)

    def _encode(self) -> bytes:
        return json.dumps(asdict(self._info())).encode()

    def _read(self, name: str) -> LockInfo | None:
        """The lock `name`; None if it is gone; RepositoryLocked-worthy junk raises ValueError."""
        try:
            data = self.backend.read(name)
        except ObjectMissing:
            return None
        try:
            return LockInfo(**json.loads(data))
        except (ValueError, TypeError, RecursionError) as e:
            raise ValueError(f"unparseable lock ({type(e).__name__})") from None

    def _conflicts(self, *, remove_stale: bool = True) -> list[tuple[str, LockInfo | None]]:
        """Locks that conflict with this one; None stands for an unparseable lock, which counts as held (by an
        exclusive holder) until its object is older than the stale timeout."""
        now = time.time()
        found: list[tuple[str, LockInfo | None]] = []
        for name, _ in self.backend.list("locks"):
            if name == self.name:
                continue
            try:
                info = self._read(name)
            except ValueError:
                written = self.backend.modified(name)
                if written is not None and now - written > self.stale_after:
                    if remove_stale:
                        self.backend.delete(name)
                    continue
                found.append((name, None))
                continue
            if info is None:  # released meanwhile
                continue
            if is_stale(info, now, self.stale_after):
                if remove_stale:
                    self.backend.delete(name)
                    self.removed.append(info)
                continue
            if self.exclusive or info.exclusive or (self.scope and info.scope == self.scope):
                found.append((name, info))
        return found

    def _describe(self, name: str, info: LockInfo | None) -> str:
        if info is None:
            return (f"{self.backend.url} is locked: {name} is not a readable lock (damaged or foreign); it counts "
                    f"as held until it is {self.stale_after:.0f} s old; if nothing holds it, delete {name} from the "
                    "repository")
        kind = "an exclusive" if info.exclusive else "a shared"
        return (f"{self.backend.url} is locked: {kind} lock {name} for {info.purpose!r}"
                f"{f' ({info.scope})' if info.scope else ''} held by pid {info.pid} on "
                f"{info.host}, refreshed {time.time() - info.refreshed:.0f} s ago; it expires after "
                f"{self.stale_after:.0f} s without refresh; if that process is gone, delete {name} from the "
                "repository")

    def acquire(self, wait: float = 0.0) -> Lock:
        """Take the lock, waiting up to `wait` seconds (with backoff) for conflicting holders to go away."""
        deadline = time.monotonic() + wait
        delay = 0.5
        while True:
            conflicts = self._conflicts()
            if not conflicts:
                self.backend.write(self.name, self._encode())
                self._last_ok = time.monotonic()
                conflicts = self._conflicts()  # someone may have locked at the same moment
                if conflicts:
                    self.backend.delete(self.name)
            if not conflicts:
                break
            if time.monotonic() + delay > deadline:
                raise RepositoryLocked(self._describe(*conflicts[0]))
            time.sleep(delay)
            delay = min(delay * 2, 10.0)
        self._thread = threading.Thread(target=self._refresh_loop, name="vaultflow-lock-refresh", daemon=True)
        self._thread.start()
        return self

    def _refresh(self) -> None:
        """Rewrite the lock with a new refresh time, unless it is no longer ours (then it is lost)."""
        try:
            current = self._read(self.name)
        except ValueError:
            current = None
        if current is None or current.token != self._token:
            raise LockLost(f"{self.name} ({self.purpose}) was removed from {self.backend.url} by another process "
                           "(it judged the lock stale: this process was stalled or could not refresh it)")
        self.backend.replace(self.name, self._encode())
        self._last_ok = time.monotonic()

    def _refresh_loop(self) -> None:
        interval = min(REFRESH_EVERY, self.stale_after / 3)
        delay = interval
        while not self._stop.wait(delay):
            try:
                self._refresh()
                delay = interval
            except LockLost as e:
                self._lost = str(e)
                return
            except Exception:  # noqa: BLE001 - storage hiccup: try again sooner, verify() judges the outcome
                self.refresh_failures += 1
                delay = _RETRY_FIRST if delay >= interval else min(delay * 2, interval)

    def verify(self) -> None:
        """The fencing check, run immediately before a commit: raises LockLost unless this lock is provably
        still held (refreshed within the timeout, its object in place and ours, no conflicting lock)."""
        if self._lost:
            raise LockLost(self._lost)
        silent = time.monotonic() - self._last_ok
        if silent > self.stale_after:
            raise LockLost(f"{self.name} ({self.purpose}) was not refreshed for {silent:.0f} s, longer than the "
                           f"{self.stale_after:.0f} s after which others may take it (process stalled or storage "
                           "unreachable); nothing was committed")
        self._refresh()
        conflicts = self._conflicts(remove_stale=False)
        if conflicts:
            raise LockLost(f"{self.name} ({self.purpose}) is no longer exclusive: {self._describe(*conflicts[0])}; "
                           "nothing was committed")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            current = self._read(self.name)
        except ValueError:
            current = None
        if current is not None and current.token == self._token:  # never delete a lock that is not ours
            self.backend.delete(self.name)

    def __enter__(self) -> Lock:
        """Take the lock, unless `acquire(wait)` already did (`with repo.lock(...).acquire(60) as lock:`)."""
        return self if self._thread is not None else self.acquire()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.release()
