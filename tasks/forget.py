"""Prefect tasks of a forget: decide per source by policy, commit a tombstone, then delete what it names.

A source's forget holds that source's lock (a backup of it waits, or is waited for), so serials never fork.
Order: the tombstone is committed first; only then are the records it names deleted. A forget stopped in between
leaves records that every reader already treats as forgotten, and the next forget deletes them.
"""

from __future__ import annotations

from datetime import UTC, datetime

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from vaultflow import __version__
from vaultflow.storage import manifest, retention
from vaultflow.storage.errors import IntegrityError, ObjectLocked, ObjectMissing
from vaultflow.storage.repository import Repository
from vaultflow.storage.snapshot import forgotten

from . import context, runs, witness
from .retry import RETRY

TASK = {"cache_policy": NO_CACHE, "persist_result": False}


class SourceForget(BaseModel):
    source: str
    kept: list[dict[str, str | int]]  # id, serial, started, why
    removed: list[dict[str, str | int]]  # id, serial, started
    tombstone: str | None  # the record that removed them (None on a dry run or when nothing goes)
    deleted: int  # record objects deleted (this forget's and leftovers of an interrupted one)


@task(**TASK)
def list_sources(run: context.Run, only: list[str]) -> list[str]:
    records = context.get(run).repo.snapshots()
    found = sorted({r.source for r in records.values()})
    missing = sorted(set(only) - set(found))
    if missing:
        from vaultflow.storage.errors import VaultflowError

        raise VaultflowError(f"no snapshots of source {missing[0]!r}; sources: {', '.join(found) or 'none'}")
    return [s for s in found if not only or s in only]


@task(**RETRY, **TASK)
def forget_source(run: context.Run, source: str, policy: retention.Policy, dry_run: bool,
                  lock_wait: float) -> SourceForget:
    """Apply `policy` to `source` under its lock: decide from the chain as it is now, commit a tombstone naming
    what goes, delete those records and their snapshot rows (their data stays until prune)."""
    repo = context.get(run).repo
    with repo.lock(purpose=f"forget of {source}", scope=f"source:{source}", run=runs.current()) \
            .acquire(lock_wait) as lock:
        runs.mark_crashed(lock.removed)
        live = [(rid, r) for rid, r in repo.snapshots().items() if r.source == source]
        decision = retention.decide(live, policy, datetime.now(UTC))
        by_id = dict(live)
        kept = [{"id": rid, "serial": by_id[rid].serial, "started": by_id[rid].started, "why": ", ".join(why)}
                for rid, why in sorted(decision.keep.items(), key=lambda kv: -by_id[kv[0]].serial)]
        removed = [{"id": rid, "serial": by_id[rid].serial, "started": by_id[rid].started}
                   for rid in decision.remove]
        leftovers = [rid for rid in forgotten(repo.chain_records)
                     if rid in repo.chain_records and repo.chain_records[rid].source == source]
        if dry_run:
            return SourceForget(source=source, kept=kept, removed=removed, tombstone=None, deleted=0)
        tomb_id = None
        if decision.remove:
            head = repo.chain_head(source)
            record = retention.tombstone(source, repo.next_serial(source), head[0] if head else None, policy,
                                         [(rid, by_id[rid]) for rid in decision.remove], list(decision.keep),
                                         __version__)
            lock.verify()  # fencing, as before a backup's commit: a holder that lost its lock commits nothing
            tomb_id = repo.commit(record)
            witness.publish_commit(run, source, record.serial, tomb_id)
        deleted = _delete(repo, [*leftovers, *decision.remove])
    get_run_logger().info("forget %s: kept %d, removed %d (%s)", source, len(kept), len(removed), policy.describe())
    return SourceForget(source=source, kept=kept, removed=removed, tombstone=tomb_id, deleted=deleted)


def _delete(repo: Repository, ids: list[str]) -> int:
    """Delete forgotten records (already named by a committed tombstone) and their own tables/snapshots rows.
    Under Object Lock the store keeps what it still retains: those stay forgotten and go in a later forget."""
    deleted = 0
    for rid in ids:
        rec = repo.chain_records.get(rid)
        try:
            repo.backend.delete(f"snapshots/{rid}")
            deleted += 1
            if rec is not None:
                _delete_row(repo, rid, manifest.snapshots_name(rec.source, rec.serial))
        except ObjectLocked as e:
            get_run_logger().info("%s", e)
    return deleted


def _delete_row(repo: Repository, rid: str, name: str) -> None:
    try:
        row = manifest.from_parquet(repo.backend.read(name), manifest.SNAPSHOTS_SCHEMA, name)
    except (ObjectMissing, IntegrityError):
        return  # none, or damaged: check reports it; a row that may be another record's is not deleted
    if row.num_rows == 1 and row["id"][0].as_py() == rid:
        repo.backend.delete(name)
