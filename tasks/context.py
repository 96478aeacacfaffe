"""How a task finds its run: a small, picklable `Run` that carries no secret, and per-process caches.

Tasks that the flow calls directly (plan, manifest, commit) run in the flow's process and find its `RunState`
(the repository it locked, the write session, local scratch). Mapped tasks (backup batches, restore and check
pack batches) may run on a thread, in a worker process of this machine or on a Dask worker elsewhere: they open
the repository themselves from the `Run` — URL, and a *reference* to the password (an env var, a file or a
Prefect Secret block) — once per process, and return only small metadata. Storage options come from the
worker's VAULTFLOW_STORAGE_OPTIONS, never from parameters (they may hold credentials).
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
from pydantic import BaseModel, ConfigDict

from vaultflow.storage.checker import Checker
from vaultflow.storage.lock import Lock
from vaultflow.storage.repository import Repository
from vaultflow.storage.restorer import Restorer
from vaultflow.storage.upload import WriteSession


class Run(BaseModel):
    """Everything a task needs to find its run, on any machine. Pickles; holds no secret and no bulk data."""

    model_config = ConfigDict(frozen=True)

    url: str  # the repository, credentials already moved into storage options (tasks.settings.split_credentials)
    session: str  # this run's id: per-process caches are keyed by it
    password_file: str | None = None  # where a worker reads the password; else VAULTFLOW_PASSWORD, else the block
    password_secret: str | None = None  # a Prefect Secret block name
    lost_packs: tuple[str, ...] = ()  # packs the index names but storage lost: a worker must not trust them
    scratch: str = ""  # the flow's local scratch folder (only tasks in the flow's process use it)


@dataclass
class RunState:
    """What only the flow's process holds for a run."""

    repo: Repository
    scratch: Path
    session: WriteSession | None = None
    restorer: Restorer | None = None
    checker: Checker | None = None
    lock: Lock | None = None  # the lock the run holds, proven before its commit
    holds: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)  # a source's capture, until close


_runs: dict[str, RunState] = {}
_lock = threading.Lock()
_preopened: dict[str, Repository] = {}  # opened by the CLI to refuse typos before a flow run exists
_KEEP_OPEN = 4  # repositories a long-lived worker keeps open (one per recent run)
_opened: OrderedDict[str, Repository] = OrderedDict()  # session → repository, in any process
_opening: dict[str, threading.Lock] = {}


def preopen(repo: Repository) -> None:
    """Hand a repository the CLI already opened (password checked) to the next run on its URL."""
    with _lock:
        _preopened[repo.url] = repo


def take_preopened(url: str) -> Repository | None:
    with _lock:
        return _preopened.pop(url, None)


def register(repo: Repository, password_file: str | None = None, password_secret: str | None = None,
             scratch_root: str | None = None) -> Run:
    """Start a run in this (the flow's) process; mapped tasks on threads here reuse `repo` itself."""
    key = uuid.uuid4().hex
    scratch = Path(tempfile.mkdtemp(prefix=f"vaultflow-{key[:8]}-", dir=scratch_root))
    with _lock:
        _runs[key] = RunState(repo, scratch)
        _remember(key, repo)
    return Run(url=repo.url, session=key, password_file=password_file, password_secret=password_secret,
               scratch=str(scratch))


def get(run: Run) -> RunState:
    """The run's state; only in the flow's process (for the tasks the flow calls directly)."""
    with _lock:
        state = _runs.get(run.session)
    if state is None:
        raise KeyError(f"run {run.session} is not open in this process: only mapped tasks run elsewhere")
    return state


def repository(run: Run) -> Repository:
    """The run's repository in this process: the flow's own one, or opened here once (a worker process or a
    Dask worker), with the packs the flow found lost already forgotten."""
    with _lock:
        repo = _opened.get(run.session)
        if repo is not None:
            _opened.move_to_end(run.session)
            return repo
        opening = _opening.setdefault(run.session, threading.Lock())
    with opening:  # threads of one worker wait for one key derivation instead of each running it
        with _lock:
            repo = _opened.get(run.session)
        if repo is None:
            repo = _open(run)
            with _lock:
                _remember(run.session, repo)
                _opening.pop(run.session, None)
    return repo


def _open(run: Run) -> Repository:
    from . import settings

    password = settings.read_password(run.password_file, run.password_secret, interactive=False)
    repo = Repository.open(run.url, password, storage_options=settings.storage_options_from_env())
    if run.lost_packs:
        repo.index.drop_packs(set(run.lost_packs))
    return repo


def _remember(session: str, repo: Repository) -> None:
    _opened[session] = repo
    _opened.move_to_end(session)
    while len(_opened) > _KEEP_OPEN:
        _opened.popitem(last=False)


def close(run: Run) -> None:
    with _lock:
        state = _runs.pop(run.session, None)
        _opened.pop(run.session, None)
    if state is not None:
        try:
            state.holds.close()  # a database source's snapshot ends here, after the commit (or the failure)
        finally:
            if state.session is not None:
                state.session.close()
            shutil.rmtree(state.scratch, ignore_errors=True)


def write_ipc(table: pa.Table, path: Path | str) -> None:
    """Write a table to run scratch as an Arrow IPC file (read back memory-mapped, without a copy)."""
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)


def read_ipc(path: Path | str) -> pa.Table:
    return pa.ipc.open_file(pa.memory_map(str(path))).read_all()


def table_to_bytes(table: pa.Table) -> bytes:
    """A small table (one batch's file list or results) as Arrow IPC bytes, to pass between processes."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return bytes(sink.getvalue())


def table_from_bytes(data: bytes) -> pa.Table:
    return pa.ipc.open_stream(pa.py_buffer(data)).read_all()
