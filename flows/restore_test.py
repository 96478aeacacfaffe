"""The restore test: restore a sample (or all) of each source's latest snapshot and prove it is right.

Run it on a schedule; a failure fails the flow run, so Prefect's notifications fire.
"""

from __future__ import annotations

import time

from prefect import flow, unmapped
from prefect.artifacts import create_table_artifact
from pydantic import BaseModel

from vaultflow.storage.errors import VaultflowError
from vaultflow.tasks import context, runner
from vaultflow.tasks.backup import open_repository
from vaultflow.tasks.restore_database import TableCheck, restore_database_test
from vaultflow.tasks.restore_test import FileCheck, pick_samples, restore_and_compare


class RestoreTestFailed(VaultflowError):
    """A sampled file did not come back byte for byte, or a restored database lacks rows it had."""


class RestoreTestResult(BaseModel):
    files: list[FileCheck]  # every sampled file: restored, hash-verified, compared with the source where it can be
    tables: list[TableCheck]  # every table of database snapshots: restored into a scratch database and counted


@flow(name="restore-test", task_runner=runner.thread_runner())
def restore_test(sample: int = 20, everything: bool = False, snapshot: str | None = None,
                 repository: str | None = None, password_secret: str | None = None,
                 task_runner: str = "auto") -> RestoreTestResult:
    """Restore `sample` random files (or `everything`) of each source's latest snapshot and compare them; one
    task per snapshot, run where `task_runner` says (auto, threads, processes or dask://HOST:PORT). A database
    source's snapshot is also loaded into a scratch database, created and dropped beside the original, and every
    table's row count compared with the count its backup recorded inside the same consistent snapshot."""
    t0 = time.monotonic()
    run = open_repository(repository, password_secret)
    try:
        samples = pick_samples(run, snapshot, sample, everything)
        with runner.pool(task_runner) as pool:
            futures = runner.map_tasks(pool, restore_and_compare, run=unmapped(run), sample=samples)
            checks = [c for f in futures for c in f.result()]
            tables = [t for s in samples if s.database for t in restore_database_test(run, s.snapshot)]
    finally:
        context.close(run)
    seconds = time.monotonic() - t0
    bad = [c for c in checks if not c.ok]
    bad_tables = [t for t in tables if not t.ok]
    if tables:
        create_table_artifact(key="restore-test-databases", table=[
            {"snapshot": t.snapshot[:12], "stream": t.stream, "table": t.table, "rows recorded": t.recorded,
             "rows restored": t.restored, "result": "pass" if t.ok else "FAIL", "detail": t.detail}
            for t in tables], description=f"{len(tables)} tables restored into scratch databases, "
                                          f"{len(bad_tables)} failed")
    table = [{"snapshot": c.snapshot[:12], "path": c.path, "bytes": c.bytes, "result": "pass" if c.ok else "FAIL",
              "compared with source": "yes" if c.compared_with_source else "no", "detail": c.detail}
             for c in checks]
    create_table_artifact(key="restore-test", table=table, description=(
        f"{len(checks)} files from {len(samples)} snapshots, {sum(c.bytes for c in checks):,} bytes, "
        f"{len(bad)} failed, {seconds:.1f} s"))
    if bad:
        raise RestoreTestFailed(f"{len(bad)} of {len(checks)} restored files are wrong; first: {bad[0].path}: "
                                f"{bad[0].detail}")
    if bad_tables:
        t = bad_tables[0]
        raise RestoreTestFailed(f"{len(bad_tables)} of {len(tables)} restored tables are wrong; first: {t.stream} "
                                f"{t.table}: {t.detail}")
    return RestoreTestResult(files=checks, tables=tables)
