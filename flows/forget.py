"""The forget flow: per source, decide by policy → commit a tombstone → delete the forgotten records → report;
then, with `prune`, free their data.

Retention follows each source's chain (serials), never the times clients claim (storage/retention.py).
"""

from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_table_artifact

from vaultflow.storage.retention import Policy
from vaultflow.tasks import context
from vaultflow.tasks.backup import open_repository
from vaultflow.tasks.forget import SourceForget, forget_source, list_sources


@flow(name="forget")
def forget(keep_last: int = 0, keep_hourly: int = 0, keep_daily: int = 0, keep_weekly: int = 0,
           keep_monthly: int = 0, keep_yearly: int = 0, keep_within: str = "", keep_tags: list[str] | None = None,
           sources: list[str] | None = None, dry_run: bool = False, repository: str | None = None,
           password_secret: str | None = None, lock_wait: float = 0.0) -> list[SourceForget]:
    """Remove snapshots that no keep rule keeps, per source (all, or `sources`); the newest of each source is
    always kept. Each removal is a tombstone record in the source's chain naming what it removed and why."""
    policy = Policy(last=keep_last, hourly=keep_hourly, daily=keep_daily, weekly=keep_weekly, monthly=keep_monthly,
                    yearly=keep_yearly, within=keep_within, tags=tuple(keep_tags or ()))
    run = open_repository(repository, password_secret)
    try:
        done = [forget_source(run, s, policy, dry_run, lock_wait) for s in list_sources(run, sources or [])]
    finally:
        context.close(run)
    rows = [{"source": d.source, "serial": r["serial"], "snapshot": str(r["id"])[:12], "started": r["started"],
             "decision": f"keep ({r['why']})" if "why" in r else ("would remove" if dry_run else "removed")}
            for d in done for r in sorted([*d.kept, *d.removed], key=lambda r: -int(r["serial"]))]
    removed = sum(len(d.removed) for d in done)
    create_table_artifact(key="forget", table=rows, description=(
        f"{'dry run: ' if dry_run else ''}{policy.describe()}: {removed} snapshots "
        f"{'would be' if dry_run else ''} removed from {len(done)} sources"))
    return done
