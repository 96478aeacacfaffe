"""Prefect tasks of a prune: plan (mark from every record, read the index), repack, index, sweep, report.

Thin wrappers over storage/prune.py. The plan holds numpy arrays: it stays in the flow's process, passed from
task to task as a plain object; only the small summary is a model (the flow's result and its artifacts).
"""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from vaultflow.storage import object_lock, prune
from vaultflow.storage.prune_plan import Plan

from . import context
from .fmt import human_bytes

# No retries: a plan is only valid under the lock it was made under, and the steps are ordered for crash safety.
TASK: dict[str, Any] = {"cache_policy": NO_CACHE, "persist_result": False}


class PruneSummary(BaseModel):
    dry_run: bool
    max_unused: str
    grace_seconds: float
    snapshots: int
    chunks_used: int
    packs: int
    packs_kept: int
    packs_repacked: int
    packs_marked: int
    packs_reindexed: int
    packs_deleted: int
    packs_retained: int  # due for deletion, but S3 Object Lock still retains them: deleted by a later prune
    packs_pending: int
    packs_lost_forgotten: int
    packs_unreadable: int
    bytes_total: int
    bytes_freed: int  # deleted by this run
    bytes_marked: int  # became deletion candidates in this run: freed by a prune after the grace period
    bytes_pending: int  # older candidates still within the grace period
    bytes_copied: int  # used bytes copied out of repacked packs
    index_files_rewritten: int
    seconds: float = 0.0

    def rows(self) -> list[dict[str, str]]:
        freed = "would be freed" if self.dry_run else "freed"
        return [
            {"measure": "snapshots marked / chunks they use", "value": f"{self.snapshots} / {self.chunks_used:,}"},
            {"measure": "packs in storage", "value": f"{self.packs} ({human_bytes(self.bytes_total)})"},
            {"measure": "packs kept", "value": str(self.packs_kept)},
            {"measure": f"packs repacked (--max-unused {self.max_unused})",
             "value": f"{self.packs_repacked} ({human_bytes(self.bytes_copied)} of used data copied to new packs)"},
            {"measure": "packs marked as deletion candidates (unused or repacked)",
             "value": f"{self.packs_marked} ({human_bytes(self.bytes_marked)}; a prune after the grace period of "
                      f"{_duration(self.grace_seconds)} deletes them)"},
            {"measure": "candidates referenced again (indexed again and kept)", "value": str(self.packs_reindexed)},
            {"measure": "candidates past the grace period, deleted",
             "value": f"{self.packs_deleted} ({human_bytes(self.bytes_freed)} {freed})"},
            {"measure": "candidates due but still retained by Object Lock (a later prune deletes them)",
             "value": str(self.packs_retained)},
            {"measure": "candidates still within the grace period",
             "value": f"{self.packs_pending} ({human_bytes(self.bytes_pending)})"},
            {"measure": "lost packs forgotten from the index (no snapshot needs them)",
             "value": str(self.packs_lost_forgotten)},
            {"measure": "packs with an unreadable trailer (left alone; see check)",
             "value": str(self.packs_unreadable)},
            {"measure": "index files rewritten", "value": str(self.index_files_rewritten)},
            {"measure": "duration", "value": f"{self.seconds:,.2f} s"},
        ]


def _duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:g} {unit}"
    return f"{seconds:g} s"


@task(**TASK)
def plan_prune(run: context.Run, max_unused: str, grace: float, now: float) -> Plan:
    """Mark every chunk the snapshots use (streaming over their files tables) and decide per pack."""
    p = prune.plan(context.get(run).repo, now=now, grace=grace, max_unused=max_unused)
    s = p.summary()
    get_run_logger().info("prune plan: %d snapshots use %d chunks; %d packs: keep %d, repack %d, mark %d, "
                          "reindex %d, delete %d, pending %d", s["snapshots"], s["chunks_used"], s["packs"],
                          s["packs_kept"], s["packs_repacked"], s["packs_marked"], s["packs_reindexed"],
                          s["packs_deleted"], s["packs_pending"])
    return p


@task(**TASK)
def repack_packs(run: context.Run, p: Plan) -> int:
    """Copy the used blobs of the packs chosen for repacking into new packs, and index them."""
    prune.repack(context.get(run).repo, p)
    return len(p.repack)


@task(**TASK)
def write_index(run: context.Run, p: Plan) -> int:
    """New index files without the packs dropped (with the packs referenced again), then the candidates object."""
    prune.reindex(context.get(run).repo, p)
    return len(p.new_index_files)


@task(**TASK)
def sweep(run: context.Run, p: Plan) -> int:
    """Delete the replaced index files and the candidates past the grace period, each step after proving that the
    exclusive lock is still held."""
    state = context.get(run)
    prune.sweep(state.repo, p, state.lock.verify if state.lock is not None else None)
    return len(p.delete)


@task(**TASK)
def extend_retention(run: context.Run) -> int:
    """Under S3 Object Lock: extend the retention of what is still needed, object by object, where it would end
    within half the period (storage/object_lock.py); released data is left to expire."""
    looked, extended = object_lock.extend_needed(context.get(run).repo)
    if looked:
        get_run_logger().info("object lock: %d needed objects looked at, retention extended on %d", looked,
                              extended)
    return extended


def summarize(p: Plan, dry_run: bool, max_unused: str, seconds: float) -> PruneSummary:
    return PruneSummary(dry_run=dry_run, max_unused=max_unused, grace_seconds=p.grace, seconds=seconds,
                        **p.summary())


@task(**TASK)
def report(summary: PruneSummary) -> PruneSummary:
    """The plan (dry run) or the result as artifacts on the flow run."""
    title = "Prune plan (dry run: nothing changed)" if summary.dry_run else "Prune"
    create_table_artifact(key="prune-summary", table=summary.rows(), description=f"vaultflow {title.lower()}")
    lines = [f"# {title}", ""] + [f"* **{r['measure']}**: {r['value']}" for r in summary.rows()]
    create_markdown_artifact(key="prune-report", markdown="\n".join(lines))
    return summary
