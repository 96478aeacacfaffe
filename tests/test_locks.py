"""Locks and never-overwriting writes under real concurrency: racing creators, lost locks, PID namespaces."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, replace

import pytest
from conftest import FAST_KDF

from vaultflow.storage.backend import Backend
from vaultflow.storage.errors import LockLost, ObjectExists, RepositoryLocked
from vaultflow.storage.lock import Lock, LockInfo, is_stale, process_start, this_host
from vaultflow.storage.repository import Repository


def test_racing_creators_of_one_name_exactly_one_wins(location):
    """exists()-then-PUT let two writers both succeed on S3; a real create-if-absent lets one."""
    backend = Backend(location.url, location.storage_options)
    for round_ in range(5):
        name = f"snapshots/race-{round_}"
        start = threading.Barrier(6)
        outcomes: list[str] = []

        def write(i: int, name: str = name, start: threading.Barrier = start, outcomes: list[str] = outcomes) -> None:
            start.wait()
            try:
                backend.write(name, f"writer {i}".encode() * 100)
                outcomes.append(f"won {i}")
            except ObjectExists:
                outcomes.append("refused")

        threads = [threading.Thread(target=write, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        winners = [o for o in outcomes if o.startswith("won")]
        assert len(winners) == 1 and outcomes.count("refused") == 5, outcomes
        assert backend.read(name) == f"writer {winners[0].split()[1]}".encode() * 100


def test_content_named_write_of_the_same_bytes_succeeds_again(location):
    backend = Backend(location.url, location.storage_options)
    backend.write("data/ab/abc", b"x" * 10, content_named=True)
    backend.write("data/ab/abc", b"x" * 10, content_named=True)  # a resumed run
    with pytest.raises(ObjectExists):
        backend.write("data/ab/abc", b"y" * 11, content_named=True)


def _repo(location) -> Repository:
    return Repository.init(location.url, "pw", storage_options=location.storage_options, kdf=FAST_KDF)


class FlakyBackend(Backend):
    """Fails the next `fail` lock refreshes (replace), as a storage hiccup would."""

    fail = 0

    def replace(self, name: str, data: bytes) -> None:
        if self.fail > 0:
            self.fail -= 1
            raise OSError("injected: storage unreachable")
        super().replace(name, data)


def test_a_failed_refresh_is_retried_and_the_lock_kept(location):
    backend = FlakyBackend(location.url, location.storage_options)
    lock = Lock(backend, exclusive=False, purpose="backup", stale_after=3.0).acquire()
    try:
        backend.fail = 2  # the first two refreshes (at ~1 s) fail; retries at +1 s and +2 s succeed
        time.sleep(4.5)
        assert lock.refresh_failures == 2
        info = LockInfo(**json.loads(backend.read(lock.name)))
        assert time.time() - info.refreshed < 3.0  # refreshed after the failures
        lock.verify()  # still held
    finally:
        lock.release()
    assert not list(backend.list("locks"))


def test_a_holder_whose_lock_was_taken_notices_before_it_commits(location):
    repo = _repo(location)
    lock = repo.lock(purpose="backup of a", scope="source:a", stale_after=60).acquire()
    try:
        lock.verify()
        repo.backend.delete(lock.name)  # another process judged it stale and removed it
        with pytest.raises(LockLost, match="removed"):
            lock.verify()
    finally:
        lock.release()


def test_a_refresh_never_recreates_a_lock_that_was_taken(location):
    repo = _repo(location)
    lock = repo.lock(purpose="backup", stale_after=1.5).acquire()  # refreshes every 0.5 s
    try:
        repo.backend.delete(lock.name)
        time.sleep(1.5)
        assert not [n for n, _ in repo.backend.list("locks")]  # the refresher stopped instead of rewriting
        with pytest.raises(LockLost):
            lock.verify()
    finally:
        lock.release()


def test_verify_fails_when_refreshes_stalled_past_the_timeout(location):
    repo = _repo(location)
    backend = FlakyBackend(location.url, location.storage_options)
    lock = Lock(backend, exclusive=False, purpose="backup", stale_after=1.5).acquire()
    try:
        backend.fail = 10**6  # storage unreachable for the holder from now on
        time.sleep(2.0)
        with pytest.raises(LockLost, match="not refreshed"):
            lock.verify()
    finally:
        backend.fail = 0
        lock.release()
    assert repo  # the repository itself is untouched


def test_unparseable_lock_counts_as_held(location):
    repo = _repo(location)
    repo.backend.write("locks/junk", b"\x00not json")
    with pytest.raises(RepositoryLocked, match="not a readable lock"):
        repo.lock(purpose="backup").acquire()
    time.sleep(1.2)  # once older than the stale timeout (by the object's own time), it no longer counts
    with repo.lock(purpose="backup", stale_after=1.0):
        pass
    assert not repo.backend.exists("locks/junk")


def _foreign(**kw: object) -> LockInfo:
    here = this_host()
    base = LockInfo(exclusive=True, host=here.host, pid=2**22 - 7, created=time.time(), refreshed=time.time(),
                    purpose="backup", boot_id=here.boot_id, pid_ns=here.pid_ns, pid_start=1, token="t")
    return replace(base, **kw)  # type: ignore[arg-type]


def test_same_hostname_in_another_pid_namespace_is_not_judged_by_pid():
    """Two containers sharing a hostname: a PID we cannot see is not proof that the holder is dead."""
    now = time.time()
    assert is_stale(_foreign(), now)  # same host, boot and namespace, dead PID: provably stale
    assert not is_stale(_foreign(pid_ns=this_host().pid_ns + 1), now)  # another container
    assert not is_stale(_foreign(boot_id="another-boot"), now)
    assert not is_stale(_foreign(boot_id="", pid_ns=0), now)  # an old lock that proves nothing: age decides
    assert is_stale(_foreign(pid_ns=this_host().pid_ns + 1, refreshed=now - 3600), now)
    me = os.getpid()
    assert not is_stale(_foreign(pid=me, pid_start=process_start(me) or 0), now)
    assert is_stale(_foreign(pid=me, pid_start=(process_start(me) or 0) + 1), now)  # PID reused by another


def test_a_lock_held_in_another_pid_namespace_is_respected(location, tmp_path):
    """A real second PID namespace (unshare) holds a lock whose PID means nothing here: it is not deleted."""
    repo = _repo(location)
    script = tmp_path / "hold.py"
    script.write_text(
        "import sys, time, json\n"
        "from vaultflow.storage.repository import Repository\n"
        f"opts = json.loads({json.dumps(json.dumps(location.storage_options))})\n"
        f"repo = Repository.open({location.url!r}, 'pw', storage_options=opts)\n"
        "with repo.lock(exclusive=True, purpose='prune'):\n"
        "    print('held', flush=True)\n"
        "    time.sleep(30)\n")
    child = subprocess.Popen(["unshare", "--pid", "--fork", sys.executable, str(script)], stdout=subprocess.PIPE,
                             text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "held"
        [(name, _)] = list(repo.backend.list("locks"))
        info = LockInfo(**json.loads(repo.backend.read(name)))
        assert info.pid_ns != this_host().pid_ns
        with pytest.raises(RepositoryLocked, match="exclusive"):
            repo.lock(purpose="backup").acquire()
        assert repo.backend.exists(name)
    finally:
        child.kill()
        child.wait()


HOLDER = """
import json, sys, time
from vaultflow.storage.repository import Repository
from vaultflow.storage.errors import LockLost
url, opts = sys.argv[1], json.loads(sys.argv[2])
repo = Repository.open(url, "pw", storage_options=opts)
lock = repo.lock(purpose="backup of a", scope="source:a", stale_after=2.0).acquire()
print("held", flush=True)
sys.stdin.readline()  # the parent freezes us (SIGSTOP) here, then resumes us and writes a line
try:
    lock.verify()
    print("committed", flush=True)
except LockLost as e:
    print("lost", e, flush=True)
"""


def test_a_frozen_holder_resumed_after_its_timeout_does_not_commit(location):
    """SIGSTOP past the timeout: another backup takes the source; the first must notice before committing."""
    repo = _repo(location)
    child = subprocess.Popen([sys.executable, "-c", HOLDER, location.url, json.dumps(location.storage_options)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdin is not None and child.stdout is not None
    try:
        assert child.stdout.readline().strip() == "held"
        with pytest.raises(RepositoryLocked):
            repo.lock(purpose="backup of a", scope="source:a", stale_after=2.0).acquire()
        os.kill(child.pid, signal.SIGSTOP)
        time.sleep(3.0)
        second = repo.lock(purpose="backup of a", scope="source:a", stale_after=2.0).acquire()  # stale: taken
        os.kill(child.pid, signal.SIGCONT)
        child.stdin.write("go\n")
        child.stdin.flush()
        assert child.stdout.readline().startswith("lost")
        second.verify()  # the new holder still holds it
        second.release()
    finally:
        child.kill()
        child.wait()


def test_lock_info_round_trips_with_every_field():
    info = _foreign()
    assert LockInfo(**json.loads(json.dumps(asdict(info)))) == info
