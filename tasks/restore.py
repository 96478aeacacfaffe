"""Prefect tasks of a restore: plan (validate, create folders and files), write packs in batches, finish.

Plan and finish run in the flow's process, whose Restorer holds the target's fd. Pack batches run wherever the
task runner puts them: on the flow's threads they use that Restorer; in a worker process they load a ChunkWriter
from the plan that plan_restore wrote to run scratch. Tasks pass pack names, byte counts and failures only.
"""

from __future__ import annotations

import os
import socket
import threading
from collections import OrderedDict
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from vaultflow.storage.errors import VaultflowError
from vaultflow.storage.restorer import ChunkWriter, Restorer, select

from . import context, runner
from .fmt import human_bytes
from .retry import RETRY

TASK = {"cache_policy": NO_CACHE, "persist_result": False}
_KEEP_PLANS = 4  # loaded plans a long-lived worker keeps (one per recent run)
_writers: OrderedDict[tuple[str, str], ChunkWriter] = OrderedDict()  # (run session, plan) -> writer, per process
_writers_lock = threading.Lock()


class RestorePlan(BaseModel):
    snapshot: str
    source: str
    serial: int
    entries: int
    bytes: int
    pack_batches: list[list[str]]
    task_runner: str  # what runner.choose made of the flow's task_runner for this restore's size
    plan_path: str | None  # the plan workers load (run scratch); None when batches run on the flow's threads


class PacksRestored(BaseModel):
    """What one batch of packs did, wherever it ran."""

    bytes: int
    failed: dict[str, str]  # path -> why
    writer: str  # HOST:PID of the process that wrote them


class RestoreSummary(BaseModel):
    snapshot: str
    target: str
    files: int
    bytes: int
    dirs: int
    links: int
    failed: dict[str, str]
    skipped: dict[str, str]
    seconds: float
    writers: list[str] = []  # HOST:PID of every process that wrote packs (the flow's own, workers' …)

    def rows(self) -> list[dict[str, str]]:
        return [{"measure": "snapshot", "value": self.snapshot[:12]}, {"measure": "target", "value": self.target},
                {"measure": "files restored and verified", "value": f"{self.files:,}"},
                {"measure": "bytes", "value": human_bytes(self.bytes)},
                {"measure": "directories / symlinks", "value": f"{self.dirs:,} / {self.links:,}"},
                {"measure": "failed", "value": f"{len(self.failed):,}"},
                {"measure": "notes (not in the snapshot, partial reads, sockets)",
                 "value": f"{len(self.skipped):,}"},
                {"measure": "duration", "value": f"{self.seconds:,.2f} s"}]


@task(**RETRY, **TASK)
def plan_restore(run: context.Run, snapshot: str, target: str, includes: list[str], overwrite: bool,
                 task_runner: str = "auto", packs_per_batch: int = 8) -> RestorePlan:
    """Validate, create the folders and empty files; for batches run elsewhere, write the plan to run scratch."""
    state = context.get(run)
    rid, record = state.repo.find_snapshot(snapshot)
    lost = state.repo.forget_lost_packs()  # read surviving copies of their chunks; the rest fail by name
    if lost:
        get_run_logger().warning("%s packs named by the index are missing from storage (first: %s)", len(lost),
                                 lost[0])
    table = select(state.repo.files_table(record), includes)
    restorer = state.restorer = Restorer(state.repo, table, target, overwrite=overwrite)
    packs = restorer.prepare()
    total = sum(r["size"] for r in restorer.rows if r["type"] == "file")
    chosen = runner.choose(task_runner)
    # at least ~3 batches per worker, so that no worker waits long for the last one
    per_batch = max(1, min(packs_per_batch, -(-len(packs) // (3 * runner.workers()))))
    plan_path = restorer.save_plan(state.scratch / "restore-plan") if chosen != "threads" else None
    get_run_logger().info("restoring %s entries of snapshot %s from %s packs on %s", len(restorer.rows), rid[:12],
                          len(packs), chosen)
    return RestorePlan(snapshot=rid, source=record.source, serial=record.serial, entries=len(restorer.rows),
                       bytes=total, pack_batches=[packs[i:i + per_batch] for i in range(0, len(packs), per_batch)],
                       task_runner=chosen, plan_path=plan_path)


@task(**TASK)
def restore_packs(run: context.Run, plan_path: str | None, packs: list[str]) -> PacksRestored:
    """Fetch each pack of the batch once, verify its chunks, write them into the files. No progress here: the
    flow counts the bytes as batches complete (a worker process cannot reach the flow's progress bar)."""
    try:
        restorer = context.get(run).restorer
    except KeyError:  # a worker process or a Dask worker
        restorer = None
    written = restorer.write_packs(packs) if restorer is not None else _plan_writer(run, plan_path).write(packs)
    return PacksRestored(bytes=written.bytes, failed=written.failed, writer=f"{socket.gethostname()}:{os.getpid()}")


def _plan_writer(run: context.Run, plan_path: str | None) -> ChunkWriter:
    """The ChunkWriter of the run's plan, loaded once per process (and kept for a few recent runs)."""
    if plan_path is None:
        raise VaultflowError(f"restore run {run.session}: a batch ran outside the flow's process, and no plan was "
                           "written for it")
    key = (run.session, plan_path)
    with _writers_lock:  # loading takes a fraction of a second: a worker's threads wait instead of repeating it
        writer = _writers.get(key)
        if writer is None:
            writer = _writers[key] = ChunkWriter.load(context.repository(run), Path(plan_path))
            while len(_writers) > _KEEP_PLANS:
                _writers.popitem(last=False)
        _writers.move_to_end(key)
    return writer


def keep_failures(run: context.Run, done: PacksRestored) -> None:
    """In the flow's process: a batch's failures join the restore's own, so finish skips those files."""
    restorer = context.get(run).restorer
    assert restorer is not None
    restorer.add_failures(done.failed)


@task(**TASK)
def finish_restore(run: context.Run, snapshot: str, target: str, seconds: float) -> RestoreSummary:
    restorer = context.get(run).restorer
    assert restorer is not None
    r = restorer.finish()
    logger = get_run_logger()
    for path, why in list(r.failed.items())[:100]:
        logger.error("%s: %s", path, why)
    return RestoreSummary(snapshot=snapshot, target=target, files=r.files, bytes=r.bytes, dirs=r.dirs,
                          links=r.links, failed=r.failed, skipped=r.skipped, seconds=seconds)
