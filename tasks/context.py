"""Per-run state that must not travel through Prefect parameters or results: the open repository.

Tasks receive a short run key and look the repository up here; bulk bytes stay inside the process.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from vaultflow.storage.checker import Checker
from vaultflow.storage.lock import Lock
from vaultflow.storage.repository import Repository
from vaultflow.storage.restorer import Restorer
from vaultflow.storage.upload import WriteSession


@dataclass
class RunState:
    repo: Repository
    scratch: Path
    session: WriteSession | None = None
    restorer: Restorer | None = None
    checker: Checker | None = None
    lock: Lock | None = None  # the lock the run holds, proven before its commit


_runs: dict[str, RunState] = {}
_lock = threading.Lock()
_preopened: dict[str, Repository] = {}  # opened by the CLI to refuse typos before a flow run exists


def preopen(repo: Repository) -> None:
    """Hand a repository the CLI already opened (password checked) to the next run on its URL."""
    with _lock:
        _preopened[repo.url] = repo


def take_preopened(url: str) -> Repository | None:
    with _lock:
        return _preopened.pop(url, None)


def register(repo: Repository, scratch_root: str | None = None) -> str:
    key = uuid.uuid4().hex
    scratch = Path(tempfile.mkdtemp(prefix=f"vaultflow-{key[:8]}-", dir=scratch_root))
    with _lock:
        _runs[key] = RunState(repo, scratch)
    return key


def get(key: str) -> RunState:
    with _lock:
        state = _runs.get(key)
    if state is None:
        raise KeyError(f"no open repository for run key {key}: tasks of one run must share its process")
    return state


def close(key: str) -> None:
    with _lock:
        state = _runs.pop(key, None)
    if state is not None:
        if state.session is not None:
            state.session.close()
        shutil.rmtree(state.scratch, ignore_errors=True)


def write_ipc(table: pa.Table, path: Path | str) -> None:
    """Write a table to run scratch as an Arrow IPC file (read back memory-mapped, without a copy)."""
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)


def read_ipc(path: Path | str) -> pa.Table:
    return pa.ipc.open_file(pa.memory_map(str(path))).read_all()
