"""The restore test: restore a sample (or all) of each source's latest snapshot and prove it is right.

Run it on a schedule; a failure fails the flow run, so Prefect's notifications fire.
"""

from __future__ import annotations

import time

from prefect import flow, unmapped
from prefect.artifacts import create_table_artifact

from vaultflow.storage.errors import VaultflowError
from vaultflow.tasks import context, runner
from vaultflow.tasks.backup import open_repository
from vaultflow.tasks.restore_test import FileCheck, pick_samples, restore_and_compare


class RestoreTestFailed(VaultflowError):
    """A sampled file did not come back byte for byte."""


@flow(name="restore-test", task_runner=runner.thread_runner())
def restore_test(sample: int = 20, everything: bool = False, snapshot: str | None = None,
                 repository: str | None = None, password_secret: str | None = None,
                 task_runner: str = "auto") -> list[FileCheck]:
    """Restore `sample` random files (or `everything`) of each source's latest snapshot and compare them; one
    task per snapshot, run where `task_runner` says (auto, threads, processes or dask://HOST:PORT)."""
    t0 = time.monotonic()
    run = open_repository(repository, password_secret)
    try:
        samples = pick_samples(run, snapshot, sample, everything)
        with runner.pool(task_runner) as pool:
            futures = runner.map_tasks(pool, restore_and_compare, run=unmapped(run), sample=samples)
            checks = [c for f in futures for c in f.result()]
    finally:
        context.close(run)
    seconds = time.monotonic() - t0
    bad = [c for c in checks if not c.ok]
    table = [{"snapshot": c.snapshot[:12], "path": c.path, "bytes": c.bytes, "result": "pass" if c.ok else "FAIL",
              "compared with source": "yes" if c.compared_with_source else "no", "detail": c.detail}
             for c in checks]
    create_table_artifact(key="restore-test", table=table, description=(
        f"{len(checks)} files from {len(samples)} snapshots, {sum(c.bytes for c in checks):,} bytes, "
        f"{len(bad)} failed, {seconds:.1f} s"))
    if bad:
        raise RestoreTestFailed(f"{len(bad)} of {len(checks)} restored files are wrong; first: {bad[0].path}: "
                                f"{bad[0].detail}")
    return checks
