"""Prefect tasks that restore a database source's snapshot into a database, and prove one in a restore test.

The dump streams come out of the repository verified (storage.dump) into private run scratch (pg_restore --jobs
needs a file), then the source's own `load` puts them into the database the URL names.
"""

from __future__ import annotations

import shutil
import tempfile
import uuid
from pathlib import Path

import pyarrow.compute as pc
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from vaultflow.storage import dump
from vaultflow.storage.errors import SourceError
from vaultflow.storage.repository import Repository
from vaultflow.storage.snapshot import SnapshotRecord

from . import context, sources
from .retry import RETRY

TASK = {"cache_policy": NO_CACHE, "persist_result": False}


class FetchedStreams(BaseModel):
    snapshot: str
    source: str
    serial: int
    kind: str  # the source kind that made the snapshot
    files: dict[str, str]  # stream name -> verified copy on run scratch
    bytes: int


class TableCheck(BaseModel):
    """One table of a restore test: rows recorded at backup time against rows in the restored database."""

    snapshot: str
    stream: str
    table: str
    recorded: int
    restored: int | None
    ok: bool
    detail: str


def _fetch(repo: Repository, record: SnapshotRecord, names: list[str], folder: Path) -> tuple[dict[str, str], int]:
    table = repo.files_table(record)
    files, total = {}, 0
    for i, name in enumerate(names):
        row = dump.find_entry(table, name)
        path = folder / f"stream-{i}"  # never the recorded name: a manifest must not choose scratch paths
        with open(path, "wb") as out:
            total += dump.write_entry(repo, row, out)
        files[name] = str(path)
    return files, total


def _kind_of(record: SnapshotRecord) -> str:
    return sources.for_paths(record.paths).kind if record.paths else "filesystem"


@task(**RETRY, **TASK)
def fetch_streams(run: context.Run, snapshot: str, streams: list[str]) -> FetchedStreams:
    """Write the snapshot's dump streams (all of them, or those named) to run scratch, every byte verified."""
    state = context.get(run)
    rid, record = state.repo.find_snapshot(snapshot)
    if not streams:
        table = state.repo.files_table(record)
        streams = table.filter(pc.equal(table["type"], "file"))["path"].to_pylist()
    folder = state.scratch / "streams"
    folder.mkdir(exist_ok=True)
    files, total = _fetch(state.repo, record, streams, folder)
    return FetchedStreams(snapshot=rid, source=record.source, serial=record.serial, kind=_kind_of(record),
                          files=files, bytes=total)


@task(**TASK)
def load_database(fetched: FetchedStreams, database: str, jobs: int) -> list[str]:
    """Load the fetched streams into the database `database` names, with the source kind's own tool."""
    target = sources.for_paths([database])
    if target.kind != fetched.kind:
        raise SourceError(f"snapshot {fetched.snapshot[:12]} holds a {fetched.kind} backup; it cannot be restored "
                          f"into {target.url} ({target.kind})")
    done = target.load({name: Path(p) for name, p in fetched.files.items()}, jobs)
    for line in done:
        get_run_logger().info("%s", line)
    return done


@task(**TASK)
def restore_database_test(run: context.Run, snapshot: str, jobs: int = 2) -> list[TableCheck]:
    """Restore each dump stream of `snapshot` into a scratch database the source creates beside the original and
    drops afterwards, and compare every table's row count with what the backup recorded inside its snapshot."""
    repo = context.repository(run)
    record = repo.snapshot(snapshot)
    expected = repo.databases_table(record)
    src = sources.for_paths(record.paths)
    checks: list[TableCheck] = []
    folder = Path(tempfile.mkdtemp(prefix="vaultflow-restore-test-db-"))
    try:
        for stream in sorted(set(expected["stream"].to_pylist())):
            rows = expected.filter(pc.equal(expected["stream"], stream)).to_pylist()
            files, _ = _fetch(repo, record, [stream], folder)
            with src.scratch_database(uuid.uuid4().hex[:8]) as scratch:
                scratch.load({stream: Path(files[stream])}, jobs)
                got = scratch.count([r["table"] for r in rows])
            Path(files[stream]).unlink()
            for r in rows:
                n = got.get(r["table"])
                ok = n == r["rows"]
                checks.append(TableCheck(snapshot=snapshot, stream=stream, table=r["table"], recorded=r["rows"],
                                         restored=n, ok=ok, detail="row count matches" if ok else
                                         "missing after restore" if n is None else
                                         f"{n} rows restored, {r['rows']} recorded"))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return checks
