"""The restore flow: plan → write packs (mapped batches, on threads, worker processes or Dask) → verify and
finish → report.

Every chunk's keyed hash and every file's content hash is checked on the way out. Plan and finish run in the
flow's process: the target is opened once there, and only there are links, special files and metadata made.
"""

from __future__ import annotations

import os
import time

from prefect import flow, unmapped
from prefect.artifacts import create_table_artifact

from vaultflow.storage.errors import VaultflowError
from vaultflow.tasks import context, progress, runner, runs
from vaultflow.tasks.backup import open_repository
from vaultflow.tasks.restore import RestoreSummary, finish_restore, keep_failures, plan_restore, restore_packs


class RestoreFailed(VaultflowError):
    """Some files could not be restored correctly; the others were."""


@flow(name="restore", task_runner=runner.thread_runner())
def restore(snapshot: str, target: str, includes: list[str] | None = None, overwrite: bool = False,
            repository: str | None = None, password_secret: str | None = None,
            task_runner: str = "auto") -> RestoreSummary:
    """Restore `snapshot` (id prefix, latest, SOURCE:latest, SOURCE:SERIAL) into the folder `target`; pack
    batches are written where `task_runner` says (auto, threads, processes or dask://HOST:PORT; workers must
    see `target` as the flow does)."""
    t0 = time.monotonic()
    run = open_repository(repository, password_secret)
    try:
        # A shared lock: `repair index` and prune (exclusive) wait until the restore has read what it needs.
        with context.get(run).repo.lock(purpose=f"restore of {snapshot}", run=runs.current()) as lock:
            runs.mark_crashed(lock.removed)
            plan = plan_restore(run, snapshot, target, includes or [], overwrite, task_runner)
            progress.start(run, plan.bytes, plan.entries, key="restore-progress", description="bytes written")
            with runner.pool(plan.task_runner) as pool:
                futures = runner.map_tasks(pool, restore_packs, run=unmapped(run), plan_path=unmapped(plan.plan_path),
                                           packs=plan.pack_batches)
                writers: set[str] = set()
                for future in runner.as_completed(futures):
                    done = future.result()
                    progress.advance(run, done.bytes, 0)
                    keep_failures(run, done)
                    writers.add(done.writer)
            summary = finish_restore(run, plan.snapshot, os.path.abspath(target), time.monotonic() - t0)
            summary = summary.model_copy(update={"writers": sorted(writers)})
    finally:
        progress.finish(run)
        context.close(run)
    create_table_artifact(key="restore-summary", table=summary.rows(), description=f"restore of {snapshot}")
    if summary.failed:
        shown = "; ".join(f"{p}: {w}" for p, w in list(summary.failed.items())[:5])
        raise RestoreFailed(f"{len(summary.failed)} entries were not restored correctly ({shown}"
                            f"{' …' if len(summary.failed) > 5 else ''}); the other {summary.files} files were")
    return summary
