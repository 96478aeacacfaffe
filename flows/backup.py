"""The backup flow: discover → detect changes → process batches → manifest → commit → verify → report.

Each step is a Prefect task; the flow body is the runbook.
"""

from __future__ import annotations

import time

from prefect import flow, unmapped

from vaultflow.storage.errors import VaultflowError
from vaultflow.storage.manifest import check_source_name
from vaultflow.storage.snapshot import utc_now
from vaultflow.tasks import context, progress, runner, runs, sources
from vaultflow.tasks.backup import (
    BatchResult,
    batch_files,
    commit_snapshot,
    discover,
    find_lineage,
    keep_results,
    open_repository,
    plan_changes,
    process_batch,
    verify_snapshot,
    write_manifest,
)
from vaultflow.tasks.report import BackupSummary, report
from vaultflow.tasks.witness import publish_commit


class ErrorBudgetExceeded(VaultflowError):
    """More files failed than the run allows; the snapshot was still committed with what could be read."""


def default_source_name(paths: list[str]) -> str:
    """A stable source name from what is backed up: /home/ann/data → home-ann-data (the source's own rule)."""
    return sources.for_paths(paths).default_name()


@flow(name="backup", task_runner=runner.thread_runner())
def backup(paths: list[str], source: str | None = None, repository: str | None = None, full: bool = False,
           excludes: list[str] | None = None, error_budget: int = 100, verify_sample: int = 8,
           password_secret: str | None = None, lock_wait: float = 0.0, task_runner: str = "auto") -> BackupSummary:
    """Back up what `paths` name — local trees and files, or one URL of any registered source (s3://…,
    postgresql://…, sqlite:///…; tasks/sources/) — as a new snapshot of `source` (default: named after them).

    One directory is stored relative to itself; several paths relative to their common folder, so a restore
    recreates them side by side. Another backup of the same source holding the lock is waited for up to
    `lock_wait` seconds, then the run fails clearly: two backups of one source never interleave.
    `task_runner`: where the batches run — auto, threads, processes or dask://HOST:PORT (tasks/runner.py)."""
    t0 = time.monotonic()
    src = sources.for_paths(paths)
    paths = src.shown_paths  # absolute local paths, or the URL without credentials
    source = check_source_name(source or src.default_name())
    run = open_repository(repository, password_secret)
    state = context.get(run)
    try:
        with state.repo.lock(purpose=f"backup of {source}", scope=f"source:{source}", run=runs.current()) \
                .acquire(lock_wait) as state.lock:
            runs.mark_crashed(state.lock.removed)
            started = utc_now()  # after the lock: a backup that waited behind another is not a rollback
            lineage = find_lineage(run, source)
            parent = lineage.parent
            listing = discover(run, paths, excludes or [])
            state.session = state.repo.write_session()
            adopted = state.session.adopt_orphan_packs()  # and forgets lost packs, before the plan trusts them
            # Workers open the repository themselves: they must not trust packs found lost, and they must see
            # the leftovers just adopted (indexed now, so a worker's index has them and does not store them again).
            run = run.model_copy(update={"lost_packs": tuple(state.session.missing_packs)})
            state.session.write_index()
            plan = plan_changes(run, listing.listing, parent, full, listing.source.streams)
            progress.start(run, plan.bytes_to_read, plan.files_to_read)
            read_list = context.read_ipc(state.scratch / "read.arrow")
            done: list[BatchResult] = []
            with runner.pool(task_runner, plan.files_to_read, runner.BACKUP_PROCESSES_FROM_FILES) as pool:
                futures = runner.map_tasks(pool, process_batch, run=unmapped(run), source=unmapped(listing.source),
                                           start=[b[0] for b in plan.batches],
                                           files=[batch_files(read_list, *b) for b in plan.batches])
                for future in runner.as_completed(futures):
                    batch = future.result()
                    progress.advance(run, batch.stats["bytes_read"], batch.stats["files"])
                    done.append(batch)
            del read_list
            totals = keep_results(run, done)
            serial = lineage.serial
            written = write_manifest(run, source, serial, listing.errors,
                                     [name for b in done for name in b.index_files])
            s = state.session.stats
            stats = {**written.stats, "bytes_read": totals.get("bytes_read", 0),
                     "bytes_added": totals.get("bytes_added", 0) + s.bytes_new_raw,
                     "bytes_stored": totals.get("bytes_stored", 0) + s.bytes_new_stored,
                     "packs_uploaded": totals.get("packs_uploaded", 0) + s.packs_uploaded, "packs_adopted": adopted,
                     "blobs_duplicate": totals.get("blobs_duplicate", 0)}
            snapshot = commit_snapshot(run, source, serial, parent, lineage.previous, started, utc_now(), paths,
                                       written, stats)
            publish_commit(run, source, serial, snapshot)
            verified = verify_snapshot(run, snapshot, verify_sample)
    finally:
        progress.finish(run)
        context.close(run)
    summary = report(BackupSummary(
        snapshot=snapshot, source=source, serial=serial, files=stats["files"],
        files_new=stats["files_new"], files_changed=stats["files_changed"], files_unchanged=stats["files_unchanged"],
        errors=stats["errors"], bytes=stats["bytes"],
        bytes_read=stats["bytes_read"], bytes_added=stats["bytes_added"], bytes_stored=stats["bytes_stored"],
        packs_uploaded=stats["packs_uploaded"], packs_adopted=adopted, chunks_verified=verified,
        seconds=time.monotonic() - t0))
    if summary.errors > error_budget:
        raise ErrorBudgetExceeded(f"{summary.errors} files could not be backed up, more than the error budget of "
                                  f"{error_budget}; snapshot {snapshot[:12]} was committed with the rest")
    return summary
