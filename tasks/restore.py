"""Prefect tasks of a restore: plan (validate, create folders and files), write packs in batches, finish.

The restorer with its plan lives in tasks.context; tasks pass pack names and byte counts only.
"""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from vaultflow.storage.restorer import Restorer, select

from . import context, progress
from .fmt import human_bytes
from .retry import RETRY

TASK = {"cache_policy": NO_CACHE, "persist_result": False}


class RestorePlan(BaseModel):
    snapshot: str
    source: str
    serial: int
    entries: int
    bytes: int
    pack_batches: list[list[str]]


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
def plan_restore(run: str, snapshot: str, target: str, includes: list[str], overwrite: bool,
                 packs_per_batch: int = 8) -> RestorePlan:
    state = context.get(run)
    rid, record = state.repo.find_snapshot(snapshot)
    lost = state.repo.forget_lost_packs()  # read surviving copies of their chunks; the rest fail by name
    if lost:
        get_run_logger().warning("%s packs named by the index are missing from storage (first: %s)", len(lost),
                                 lost[0])
    table = select(state.repo.files_table(record), includes)
    restorer = state.restorer = Restorer(state.repo, table, target, overwrite=overwrite,
                                         progress=lambda n: progress.advance(run, n, 0))
    packs = restorer.prepare()
    total = sum(r["size"] for r in restorer.rows if r["type"] == "file")
    get_run_logger().info("restoring %s entries of snapshot %s from %s packs", len(restorer.rows), rid[:12],
                          len(packs))
    return RestorePlan(snapshot=rid, source=record.source, serial=record.serial, entries=len(restorer.rows),
                       bytes=total, pack_batches=[packs[i:i + packs_per_batch]
                                                  for i in range(0, len(packs), packs_per_batch)])


@task(**TASK)
def restore_packs(run: str, packs: list[str]) -> int:
    """Fetch each pack of the batch once, verify its chunks, write them into the files; returns bytes."""
    restorer = context.get(run).restorer
    assert restorer is not None
    return restorer.restore_packs(packs)


@task(**TASK)
def finish_restore(run: str, snapshot: str, target: str, seconds: float) -> RestoreSummary:
    restorer = context.get(run).restorer
    assert restorer is not None
    r = restorer.finish()
    logger = get_run_logger()
    for path, why in list(r.failed.items())[:100]:
        logger.error("%s: %s", path, why)
    return RestoreSummary(snapshot=snapshot, target=target, files=r.files, bytes=r.bytes, dirs=r.dirs,
                          links=r.links, failed=r.failed, skipped=r.skipped, seconds=seconds)
