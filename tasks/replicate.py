"""Prefect tasks of `replicate`: open (or create) the replica, plan, copy batches of objects anywhere, commit.

Tasks pass object names and sizes only: an object's bytes go from the source store to the replica inside one
task, in whatever process or machine runs it. The replica is opened with the source's master key (no password).
"""

from __future__ import annotations

import itertools
import os
import signal
import threading
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from vaultflow.storage import manifest
from vaultflow.storage import replicate as repl
from vaultflow.storage.backend import Backend
from vaultflow.storage.errors import IntegrityError, ObjectExists, ObjectMissing, VaultflowError
from vaultflow.storage.lock import STALE_AFTER
from vaultflow.storage.repository import Repository

from . import context, settings
from .retry import RETRY

TASK: dict[str, Any] = {"cache_policy": NO_CACHE, "persist_result": False}
RETRYING: dict[str, Any] = {**TASK, **RETRY}
ENV_OPTIONS = "VAULTFLOW_REPLICA_STORAGE_OPTIONS"  # fsspec options (JSON) for the replicas' stores
KILL_AFTER = "VAULTFLOW_REPLICATE_KILL_AFTER"  # test hook: SIGKILL the process after it copied N packs

Item = tuple[str, int, str]  # name, size, expected BLAKE3 hex (see storage.replicate.Item)

_lock = threading.Lock()
_open: dict[tuple[str, str], Repository] = {}  # (run session, replica url) -> the replica, in this process
_KEEP_OPEN = 8


def replica_options() -> dict[str, Any]:
    return settings._json_object(ENV_OPTIONS)  # the replicas' store may differ from the repository's


def replica_backend(url: str) -> Backend:
    """The replica's store: credentials written into its URL join the options (a worker finds them in its
    environment: the CLI moves them there, never into flow parameters)."""
    clean, creds = settings.split_credentials(url)
    return Backend(clean, {**replica_options(), **creds})


def replica(run: context.Run, url: str) -> Repository:
    """The run's replica in this process: the flow's own one, or opened here once from the source's key."""
    key = (run.session, url)
    with _lock:
        found = _open.get(key)
    if found is None:
        found = _remember(run, url, repl.open_replica(context.repository(run), replica_backend(url), create=False)[0])
    return found


def _remember(run: context.Run, url: str, rep: Repository) -> Repository:
    # Not inline in a task: Prefect pickles a flow's tasks by value for worker processes, and a lock cannot be.
    with _lock:
        rep = _open.setdefault((run.session, url), rep)
        while len(_open) > _KEEP_OPEN:  # a long-lived worker serves many runs
            del _open[next(iter(_open))]
    return rep


def close(run: context.Run) -> None:
    with _lock:
        for key in [k for k in _open if k[0] == run.session]:
            del _open[key]


class Replica(BaseModel):
    url: str
    id: str
    created: bool
    keys_copied: int
    keys_only_here: list[str]  # key files the source no longer has: their passwords still open the replica
    keys_failed: list[tuple[str, str]]  # source key files that failed verification: not copied


@task(**RETRYING)
def open_destination(run: context.Run, url: str) -> Replica:
    """Open the replica at `url` with the source's key, creating it when the location holds no repository, and
    copy the key files it lacks (so every password of the source opens it)."""
    source = context.get(run).repo
    rep, created = repl.open_replica(source, replica_backend(url))
    copied, extra, bad = repl.sync_keys(source, rep.backend)  # after a creation: only what it could not copy
    if created:
        copied = len(list(rep.backend.list("keys")))
    _remember(run, url, rep)
    for name, age in rep.backend.temporaries(""):  # partial local writes of a killed run, as a backup does
        if age > STALE_AFTER:
            rep.backend.delete(name)
    logger = get_run_logger()
    logger.info("%s replica %s at %s", "created" if created else "opened", rep.config.id, settings.redact(url))
    if extra:
        logger.warning("key files only on the replica (passwords removed from the source still open it): %s; "
                       "remove them with `vaultflow key remove --repo REPLICA`", ", ".join(extra))
    return Replica(url=url, id=rep.config.id, created=created, keys_copied=copied, keys_only_here=extra,
                   keys_failed=bad)


class Lag(BaseModel):
    """How far a replica is behind its source, for monitoring."""

    replica: str
    snapshots_behind: int
    objects_behind: int
    bytes_behind: int
    sources: dict[str, tuple[int, int]]  # source -> (newest serial on the source, on the replica)


def lag_of(plan: repl.Plan, url: str) -> Lag:
    objects = plan.objects()
    return Lag(replica=settings.redact(url), snapshots_behind=len(plan.records), objects_behind=len(objects),
               bytes_behind=sum(i.size for i in objects), sources=plan.heads)


class ReplicationPlan(BaseModel):
    pack_batches: list[list[Item]]
    index_files: list[list[Item]]
    manifests: list[list[Item]]
    records: list[Item]
    damaged: list[tuple[str, str]]  # source objects that failed verification: never copied
    lost_packs: list[str]
    lost_kept: list[str]
    lag: Lag


def batches(items: list[repl.Item], batch_bytes: int, batch_objects: int = 256) -> list[list[Item]]:
    """Consecutive batches of at most `batch_bytes` (or one larger object) and `batch_objects` objects."""
    out: list[list[Item]] = []
    size = 0
    for i in items:
        if not out or (out[-1] and (size + i.size > batch_bytes or len(out[-1]) >= batch_objects)):
            out.append([])
            size = 0
        out[-1].append((i.name, i.size, i.digest))
        size += i.size
    return out


@task(**RETRYING)
def plan_replication(run: context.Run, url: str, snapshots: list[str], batch_bytes: int) -> ReplicationPlan:
    """List both sides and read the source's records and index files: what the replica lacks, in copy order."""
    plan = repl.plan(context.get(run).repo, replica(run, url).backend, snapshots or None)
    logger = get_run_logger()
    for name, why in sorted(plan.damaged.items()):
        logger.error("source object %s failed verification and is not copied: %s", name, why)
    for pack in plan.lost_packs:
        logger.warning("pack %s is lost on the source%s", pack, " (the replica still has it: copy it back)"
                       if pack in plan.lost_kept else ", and not on the replica: never invented")
    return ReplicationPlan(pack_batches=batches(plan.packs, batch_bytes), index_files=batches(plan.index_files,
                           batch_bytes), manifests=batches(plan.manifests, batch_bytes),
                           records=[(i.name, i.size, i.digest) for i in plan.records],
                           damaged=sorted(plan.damaged.items()), lost_packs=plan.lost_packs,
                           lost_kept=plan.lost_kept, lag=lag_of(plan, url))


class Copied(BaseModel):
    objects: int
    bytes: int
    failed: list[tuple[str, str]]  # (object, why): not copied, so nothing that needs it is committed


@task(**RETRYING)
def copy_batch(run: context.Run, url: str, items: list[Item], absent: list[str]) -> Copied:
    """Copy one batch of objects byte for byte, each hashed on the source and read back from the replica. An
    object that fails verification, or an index file naming a pack in `absent`, is named and skipped; the run
    fails once everything else is copied."""
    source, target = context.repository(run), replica(run, url)
    done = nbytes = 0
    failed: list[tuple[str, str]] = []
    for name, size, digest in items:
        try:
            nbytes += repl.copy_object(source, target.backend, repl.Item(name, size, digest), absent)
            done += 1
        except (IntegrityError, ObjectMissing, repl.Withheld) as e:
            failed.append((name, str(e)))
            continue
        if name.startswith("data/") and os.environ.get(KILL_AFTER):
            _count_pack(int(os.environ[KILL_AFTER]))
    return Copied(objects=done, bytes=nbytes, failed=failed)


_copied_packs = itertools.count(1)


def _count_pack(limit: int) -> None:
    """Test hook: SIGKILL this process once it has copied `limit` packs, as a crash there would."""
    with _lock:
        if next(_copied_packs) >= limit:
            os.kill(os.getpid(), signal.SIGKILL)


class Commit(BaseModel):
    committed: list[str]
    held: list[tuple[str, str]]  # (record, why): not committed, nor the later records of its source
    warnings: list[str]


@task(**RETRYING)
def commit_records(run: context.Run, url: str, records: list[Item]) -> Commit:
    """Write the records last, per source in serial order, each only once its data is on the replica."""
    target = replica(run, url)
    done = repl.commit_records(context.get(run).repo, target, [repl.Item(*r) for r in records])
    if not target.config.private_manifests:
        done.warnings += [w for rid in done.records for w in _write_row(target, rid)]
    logger = get_run_logger()
    for name, why in done.held:
        logger.error("record %s not committed to the replica: %s", name, why)
    for warning in done.warnings:
        logger.warning("%s", warning)
    return Commit(committed=done.records, held=done.held, warnings=done.warnings)


def _write_row(target: Repository, rid: str) -> list[str]:
    """The derived tables/snapshots row, as a backup writes it after its commit; a failure is only a warning."""
    record = target.snapshot(rid)
    if record.is_tombstone:
        return []
    name = manifest.snapshots_name(record.source, record.serial)
    data = manifest.to_parquet(manifest.snapshot_row(rid, record))
    try:
        target.backend.write(name, data)
    except ObjectExists:
        return [] if target.backend.read(name) == data else [f"{name} on the replica holds another snapshot's row"]
    except (VaultflowError, OSError) as e:
        return [f"{name}: the row was not written ({e})"]
    return []


@task(**TASK)
def measure_lag(run: context.Run, url: str) -> Lag:
    """The replica's lag as storage holds it now."""
    return lag_of(repl.plan(context.get(run).repo, replica(run, url).backend), url)
