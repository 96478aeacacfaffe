"""Restore a database source's snapshot into a database: fetch the dump streams verified → load with the
source's own tool (pg_restore --jobs, the mariadb client, a SQLite file) → report."""

from __future__ import annotations

import time

from prefect import flow
from prefect.artifacts import create_table_artifact
from pydantic import BaseModel

from vaultflow.tasks import context, runs
from vaultflow.tasks.backup import open_repository
from vaultflow.tasks.restore_database import fetch_streams, load_database
from vaultflow.tasks.sources.base import redact


class DatabaseRestoreSummary(BaseModel):
    snapshot: str
    source: str
    serial: int
    database: str  # the target, credentials removed
    streams: list[str]
    bytes: int
    loaded: list[str]
    seconds: float

    def rows(self) -> list[dict[str, str]]:
        return [{"measure": "snapshot", "value": f"{self.snapshot[:12]} ({self.source}#{self.serial})"},
                {"measure": "into", "value": self.database},
                {"measure": "streams", "value": ", ".join(self.streams)},
                {"measure": "bytes", "value": f"{self.bytes:,}"},
                *({"measure": "loaded", "value": line} for line in self.loaded),
                {"measure": "seconds", "value": f"{self.seconds:.1f}"}]


@flow(name="restore-database")
def restore_database(snapshot: str, database: str, streams: list[str] | None = None, jobs: int = 2,
                     repository: str | None = None, password_secret: str | None = None) -> DatabaseRestoreSummary:
    """Restore `snapshot`'s dump streams (all, or those named) into the database URL `database`, which must be
    new or empty; its password comes from the environment (PGPASSWORD, MYSQL_PWD, VAULTFLOW_SOURCE_PASSWORD…)."""
    t0 = time.monotonic()
    run = open_repository(repository, password_secret)
    try:
        with context.get(run).repo.lock(purpose=f"restore of {snapshot} into a database", run=runs.current()) \
                as lock:
            runs.mark_crashed(lock.removed)
            fetched = fetch_streams(run, snapshot, streams or [])
            loaded = load_database(fetched, database, jobs)
    finally:
        context.close(run)
    summary = DatabaseRestoreSummary(snapshot=fetched.snapshot, source=fetched.source, serial=fetched.serial,
                                     database=redact(database), streams=sorted(fetched.files), bytes=fetched.bytes,
                                     loaded=loaded, seconds=time.monotonic() - t0)
    create_table_artifact(key="restore-database", table=summary.rows(),
                          description=f"restore of {snapshot} into {summary.database}")
    return summary
