"""The restore flow: plan → write packs (mapped batches) → verify and finish → report.

Every chunk's keyed hash and every file's content hash is checked on the way out.
"""

from __future__ import annotations

import os
import time

from prefect import flow, unmapped
from prefect.artifacts import create_table_artifact

from vaultflow.storage.errors import VaultflowError
from vaultflow.tasks import context, progress, runs
from vaultflow.tasks.backup import open_repository
from vaultflow.tasks.restore import RestoreSummary, finish_restore, plan_restore, restore_packs
from vaultflow.tasks.runner import thread_runner


class RestoreFailed(VaultflowError):
    """Some files could not be restored correctly; the others were."""


@flow(name="restore", task_runner=thread_runner())
def restore(snapshot: str, target: str, includes: list[str] | None = None, overwrite: bool = False,
            repository: str | None = None, password_secret: str | None = None) -> RestoreSummary:
    """Restore `snapshot` (id prefix, latest, SOURCE:latest, SOURCE:SERIAL) into the folder `target`."""
    t0 = time.monotonic()
    run = open_repository(repository, password_secret)
    try:
        # A shared lock: `repair index` and prune (exclusive) wait until the restore has read what it needs.
        with context.get(run).repo.lock(purpose=f"restore of {snapshot}", run=runs.current()) as lock:
            runs.mark_crashed(lock.removed)
            plan = plan_restore(run, snapshot, target, includes or [], overwrite)
            progress.start(run, plan.bytes, plan.entries, key="restore-progress", description="bytes written")
            written = restore_packs.map(unmapped(run), plan.pack_batches)
            [w.result() for w in written]
            summary = finish_restore(run, plan.snapshot, os.path.abspath(target), time.monotonic() - t0)
    finally:
        progress.finish(run)
        context.close(run)
    create_table_artifact(key="restore-summary", table=summary.rows(), description=f"restore of {snapshot}")
    if summary.failed:
        shown = "; ".join(f"{p}: {w}" for p, w in list(summary.failed.items())[:5])
        raise RestoreFailed(f"{len(summary.failed)} entries were not restored correctly ({shown}"
                            f"{' …' if len(summary.failed) > 5 else ''}); the other {summary.files} files were")
    return summary
