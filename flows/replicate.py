"""The replicate flow: open the replica → plan → copy packs, index files, manifests (mapped batches) → commit
records → measure lag → report.

The source holds a shared lock (prune waits), the replica a `replicate` lock (one replication into it at a time).
"""

from __future__ import annotations

import time
from typing import Any

from prefect import flow, task, unmapped
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from vaultflow.storage.errors import VaultflowError
from vaultflow.tasks import context, progress, runner, runs, settings
from vaultflow.tasks.backup import open_repository
from vaultflow.tasks.fmt import human_bytes
from vaultflow.tasks.replicate import (
    Copied,
    Item,
    Lag,
    close,
    commit_records,
    copy_batch,
    measure_lag,
    open_destination,
    plan_replication,
    replica,
)


class ReplicationSummary(BaseModel):
    replica: str
    replica_id: str
    created: bool
    objects_copied: int
    bytes_copied: int
    packs_copied: int
    records_committed: int
    keys_copied: int
    failed: list[tuple[str, str]]  # source objects not copied (failed verification, missing) and records held
    lost_packs: list[str]
    lost_kept: list[str]
    warnings: list[str]
    lag: Lag
    seconds: float

    def rows(self) -> list[dict[str, str]]:
        rows = [("replica", f"{self.replica} ({self.replica_id}{', created now' if self.created else ''})"),
                ("objects copied (packs)", f"{self.objects_copied:,} ({self.packs_copied:,})"),
                ("bytes copied", human_bytes(self.bytes_copied)),
                ("snapshot records committed", f"{self.records_committed:,}"),
                ("lag: snapshots / objects / bytes behind", f"{self.lag.snapshots_behind:,} / "
                 f"{self.lag.objects_behind:,} / {human_bytes(self.lag.bytes_behind)}"),
                ("packs lost on the source (of them on the replica)", f"{len(self.lost_packs)} "
                 f"({len(self.lost_kept)})"),
                ("failures", str(len(self.failed))), ("duration", f"{self.seconds:,.2f} s")]
        return [{"measure": m, "value": v} for m, v in rows]


class ReplicationIncomplete(VaultflowError):
    """Something was not copied or committed; everything else was, and the summary says what."""

    def __init__(self, summary: ReplicationSummary) -> None:
        self.summary = summary
        name, why = summary.failed[0]
        super().__init__(f"replication to {summary.replica} is incomplete: {len(summary.failed)} objects not copied "
                         f"or committed; first: {name}: {why}")


def _copy(run: context.Run, url: str, pool: Any, batches: list[list[Item]], absent: list[str]) -> list[Copied]:
    """One kind of object, mapped over batches; the next kind starts only once this one is durable."""
    done: list[Copied] = []
    futures = runner.map_tasks(pool, copy_batch, run=unmapped(run), url=unmapped(url), items=batches,
                               absent=unmapped(absent)) if batches else []
    for future in runner.as_completed(futures):
        copied = future.result()
        progress.advance(run, copied.bytes, copied.objects + len(copied.failed))
        done.append(copied)
    return done


@flow(name="replicate", task_runner=runner.thread_runner())
def replicate(destination: str, snapshots: list[str] | None = None, repository: str | None = None,
              password_secret: str | None = None, task_runner: str = "auto",
              batch_bytes: int = 256 << 20) -> ReplicationSummary:
    """Copy the repository's snapshots to the replica at `destination` (any fsspec URL; created when it holds no
    repository): packs, index files, manifests and records byte for byte, only what it lacks, each verified;
    records last, in chain order. `snapshots` (specs like SOURCE:latest) limits it to those sources up to them."""
    t0 = time.monotonic()
    destination, _ = settings.split_credentials(destination)  # credentials come from the environment only
    run = open_repository(repository, password_secret)
    state = context.get(run)
    try:
        with state.repo.lock(purpose=f"replicate to {destination}", run=runs.current()) as lock:
            runs.mark_crashed(lock.removed)
            target = open_destination(run, destination)
            with replica(run, destination).lock(purpose=f"replicate from {state.repo.config.id}",
                                                scope="replicate", run=runs.current()) as held:
                runs.mark_crashed(held.removed)
                plan = plan_replication(run, destination, snapshots or [], batch_bytes)
                kinds = (plan.pack_batches, plan.index_files, plan.manifests)
                progress.start(run, sum(i[1] for k in kinds for b in k for i in b),
                               sum(len(b) for k in kinds for b in k), key="replicate-progress",
                               description="bytes copied to the replica")
                with runner.pool(task_runner) as pool:
                    copied = _copy(run, destination, pool, plan.pack_batches, [])
                    # an index file naming a pack the replica lacks would make it report lost data: withheld
                    absent = sorted({*(set(plan.lost_packs) - set(plan.lost_kept)),
                                     *(name for c in copied for name, _ in c.failed)})
                    packs_copied = sum(c.objects for c in copied)
                    copied += [c for kind in kinds[1:] for c in _copy(run, destination, pool, kind, absent)]
                held.verify()  # fencing: a replication that lost its lock commits nothing
                commit = commit_records(run, destination, plan.records)
                lag = measure_lag(run, destination)
    finally:
        progress.finish(run)
        close(run)
        context.close(run)
    summary = ReplicationSummary(
        replica=settings.redact(destination), replica_id=target.id, created=target.created,
        objects_copied=sum(c.objects for c in copied) + len(commit.committed),
        bytes_copied=sum(c.bytes for c in copied) + sum(r[1] for r in plan.records if r[2] in commit.committed),
        packs_copied=packs_copied,
        records_committed=len(commit.committed), keys_copied=target.keys_copied,
        failed=[*target.keys_failed, *plan.damaged, *(f for c in copied for f in c.failed), *commit.held],
        lost_packs=plan.lost_packs, lost_kept=plan.lost_kept,
        warnings=[*commit.warnings, *(f"key file {k} is only on the replica" for k in target.keys_only_here)],
        lag=lag, seconds=time.monotonic() - t0)
    report(summary)
    if summary.failed:
        raise ReplicationIncomplete(summary)
    return summary


@task(cache_policy=NO_CACHE, persist_result=False)
def report(summary: ReplicationSummary) -> None:
    """Objects and bytes copied and the lag left, as artifacts; monitoring alarms on `replica-lag`."""
    create_table_artifact(key="replicate-summary", table=summary.rows(),
                          description=f"vaultflow replication to {summary.replica}")
    create_table_artifact(key="replica-lag", table=[{"replica": summary.replica, "replica_id": summary.replica_id,
                                                     "snapshots_behind": summary.lag.snapshots_behind,
                                                     "objects_behind": summary.lag.objects_behind,
                                                     "bytes_behind": summary.lag.bytes_behind}],
                          description="how far the replica is behind its source after this run")
    lines = [f"# Replication to `{summary.replica}`", ""]
    lines += [f"* **{r['measure']}**: {r['value']}" for r in summary.rows()]
    lines += [f"* problem: `{name}`: {why}" for name, why in summary.failed]
    lines += [f"* lost on the source: `{p}`" + (" (the replica has it)" if p in summary.lost_kept else "")
              for p in summary.lost_packs]
    create_markdown_artifact(key="replicate-report", markdown="\n".join(lines))
