"""The prune flow: lock exclusively → plan (mark from every record) → repack → index → sweep → report.

Two phases with a grace period (docs/format.md §15): a pack no snapshot uses becomes a deletion candidate; a
later prune, past the grace period, marks again and deletes the candidates that are still unused.
"""

from __future__ import annotations

import time

from prefect import flow

from vaultflow.storage.prune import parse_duration, parse_max_unused
from vaultflow.tasks import context, runner, runs
from vaultflow.tasks.backup import open_repository
from vaultflow.tasks.prune import (
    PruneSummary,
    extend_retention,
    plan_prune,
    repack_packs,
    report,
    summarize,
    sweep,
    write_index,
)


@flow(name="prune", task_runner=runner.thread_runner())
def prune(dry_run: bool = False, max_unused: str = "5%", grace: str = "24h", repository: str | None = None,
          password_secret: str | None = None, lock_wait: float = 0.0) -> PruneSummary:
    """Free the data no snapshot references. Under the exclusive repository lock (waiting up to `lock_wait`
    seconds for backups, checks and restores to finish): packs nothing uses become deletion candidates; candidates
    older than `grace` (e.g. 24h, 90m, 2d) that are still unused are deleted; partly used packs are repacked
    while the unused share exceeds `max_unused` (restic's: 5%, a size such as 500M, or unlimited).
    `dry_run`: plan under a shared lock, change nothing, and report what would be freed."""
    t0 = time.monotonic()
    grace_seconds = parse_duration(grace)
    parse_max_unused(max_unused)  # a typo fails before any lock is taken
    run = open_repository(repository, password_secret)
    state = context.get(run)
    try:
        with state.repo.lock(exclusive=not dry_run, purpose="prune --dry-run" if dry_run else "prune",
                             run=runs.current()).acquire(lock_wait) as state.lock:
            runs.mark_crashed(state.lock.removed)
            plan = plan_prune(run, max_unused, grace_seconds, time.time())
            if not dry_run:
                repack_packs(run, plan)
                write_index(run, plan)
                sweep(run, plan)
                extend_retention(run)
    finally:
        context.close(run)
    return report(summarize(plan, dry_run, max_unused, time.monotonic() - t0))
