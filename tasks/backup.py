"""Prefect tasks of a backup run: thin wrappers over storage/, passing only small metadata between them.

Bulk data stays in the process (tasks.context) and on local scratch (Arrow IPC files).
"""

from __future__ import annotations

import os
import random
import socket

import pyarrow as pa
import pyarrow.compute as pc
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from vaultflow import __version__
from vaultflow.storage import archiver, manifest
from vaultflow.storage.errors import ObjectMissing, VaultflowError
from vaultflow.storage.index import Index
from vaultflow.storage.repository import Repository
from vaultflow.storage.snapshot import SnapshotRecord, parse_utc, utc_now

from . import context, progress, settings
from .retry import RETRY
from .sources.fsspec_tree import FsspecTree, is_url

# Tasks hold no cacheable inputs (a run key means nothing to another run) and return small models.
TASK = {"cache_policy": NO_CACHE, "persist_result": False}


class Parent(BaseModel):
    id: str
    serial: int
    started_ns: int  # when the parent backup started: files modified near or after it are racy


class Plan(BaseModel):
    batches: list[tuple[int, int]]
    files: int
    files_to_read: int
    bytes_total: int
    bytes_to_read: int
    entries: int


class Manifest(BaseModel):
    objects: dict[str, str]
    index_files: list[str]
    stats: dict[str, int]
    chunks: int


@task(**RETRY, **TASK)
def open_repository(repository: str | None, password_secret: str | None) -> str:
    """Open the repository once for the run; tasks find it again by the returned key."""
    s = settings.resolve(repository, None, password_secret)
    repo = Repository.open(s.url, s.password(), storage_options=s.storage_options)
    get_run_logger().info("opened repository %s at %s", repo.config.id, repo.url)
    return context.register(repo)


@task(**TASK)
def find_parent(run: str, source: str) -> Parent | None:
    """The latest snapshot of `source` by serial, whose manifest change detection compares against."""
    repo = context.get(run).repo
    latest = repo.latest(source)
    if latest is None:
        return None
    rid, rec = latest
    started = parse_utc(rec.started)
    return Parent(id=rid, serial=rec.serial, started_ns=int(started.timestamp()) * 10**9 + started.microsecond * 1000)


@task(**TASK)
def plan_changes(run: str, listing_path: str, parent: Parent | None, full: bool,
                 batch_bytes: int = 64 << 20, batch_files: int = 2048) -> Plan:
    """Join the listing with the parent manifest; write the plan and the files to read to scratch."""
    state = context.get(run)
    listing = context.read_ipc(listing_path)
    parent_files = state.repo.files_table(state.repo.snapshot(parent.id)) if parent else None
    plan = archiver.plan_changes(listing, parent_files, parent.started_ns if parent else 0, full)
    to_read = plan.filter(plan["read"])
    context.write_ipc(plan, state.scratch / "plan.arrow")
    context.write_ipc(to_read, state.scratch / "read.arrow")
    sizes = to_read["size"].to_pylist()
    files = plan.filter(pc.equal(plan["type"], "file"))
    return Plan(batches=archiver.batches(sizes, batch_bytes, batch_files), files=files.num_rows,
                files_to_read=to_read.num_rows, bytes_total=int(pc.sum(files["size"]).as_py() or 0),
                bytes_to_read=sum(sizes), entries=plan.num_rows)


@task(**RETRY, **TASK)
def process_batch(run: str, root: str, start: int, end: int) -> dict[str, int]:
    """Read, chunk, hash, compress, encrypt and pack one batch of files; results go to scratch."""
    state = context.get(run)
    assert state.session is not None
    read = context.read_ipc(state.scratch / "read.arrow").slice(start, end - start)
    remote = FsspecTree(root, settings.source_storage_options()) if is_url(root) else None
    results, stats = archiver.archive_files(state.repo, state.session, root, read["key"].to_pylist(), remote)
    context.write_ipc(results, state.scratch / f"result-{start:012d}.arrow")
    progress.advance(run, stats.bytes_read, stats.files)
    if stats.errors:
        logger = get_run_logger()
        for path, err in zip(read["path"].to_pylist(), results["error"].to_pylist(), strict=True):
            if err:
                logger.warning("%s: %s", path, err)
    return stats.__dict__


@task(**RETRY, **TASK)
def write_manifest(run: str, source: str, serial: int, discover_errors: list[tuple[str, str]]) -> Manifest:
    """Upload the last packs and the index, verify every referenced chunk is indexed, then write manifests.

    `discover_errors` are (hex of the exact path bytes, message) from the listing.
    """
    state = context.get(run)
    repo, session = state.repo, state.session
    assert session is not None
    session.flush()
    index_files = session.write_index()
    plan = context.read_ipc(state.scratch / "plan.arrow")
    read_rows = plan.filter(plan["read"])
    parts = sorted(state.scratch.glob("result-*.arrow"))
    results = pa.concat_tables([context.read_ipc(p) for p in parts]) if parts \
        else archiver.RESULT_SCHEMA.empty_table()
    files = archiver.files_table(plan, read_rows, results)
    chunks = pc.list_flatten(files["chunks"]).unique()
    _verify_indexed(repo, chunks.to_pylist())

    objects: dict[str, str] = {}
    name = manifest.files_name(source, serial, repo.config.private_manifests)
    data = manifest.to_parquet(files)
    if repo.config.private_manifests:
        data = manifest.seal_manifest(repo.master.manifest_key, os.urandom(32), data, name)
    objects[name] = _write_fresh(repo, name, data)
    errors = manifest.errors_table(files, [(bytes.fromhex(h), m) for h, m in discover_errors])
    if errors.num_rows and not repo.config.private_manifests:
        ename = manifest.errors_name(source, serial)
        objects[ename] = _write_fresh(repo, ename, manifest.to_parquet(errors))
    is_file = pc.equal(files["type"], "file")
    status = files.filter(is_file)["status"].value_counts().to_pylist()
    counts = {f"files_{k}": 0 for k in ("new", "changed", "unchanged", "error")}
    counts.update({f"files_{d['values']}": int(d["counts"]) for d in status})
    stats = {"entries": files.num_rows, "files": int(pc.sum(is_file).as_py() or 0),
             "bytes": int(pc.sum(pc.if_else(is_file, files["size"], 0)).as_py() or 0),
             "errors": errors.num_rows, **counts}
    return Manifest(objects=objects, index_files=index_files, stats=stats, chunks=len(chunks))


def _verify_indexed(repo: Repository, chunk_ids: list[bytes]) -> None:
    """Every chunk the manifest references must be in the index as stored (not just in memory)."""
    fresh = Index()
    for name, _ in repo.backend.list("index"):
        fresh.add_columns(*repo.read_index_file(name))
    missing = [c for c, ok in zip(chunk_ids, fresh.contains_many(chunk_ids), strict=True) if not ok]
    if missing:
        raise ObjectMissing(f"{len(missing)} chunks referenced by the new manifest are in no index file "
                            f"(first: {missing[0].hex()}); the snapshot was not committed")


def _write_fresh(repo: Repository, name: str, data: bytes) -> str:
    # An object at this name was left by a run that crashed before its commit: no record refers to it,
    # and this run holds the source's lock, so it is garbage to replace.
    if repo.backend.exists(name):
        repo.backend.delete(name)
    return repo.write_object(name, data)


@task(**RETRY, **TASK)
def commit_snapshot(run: str, source: str, serial: int, parent: Parent | None, started: str, paths: list[str],
                    written: Manifest, stats: dict[str, int]) -> str:
    """Write the snapshot record: the commit point. Returns the snapshot id."""
    repo = context.get(run).repo
    record = SnapshotRecord(source=source, serial=serial, started=started, finished=utc_now(),
                            host=socket.gethostname(), parent=parent.id if parent else None,
                            previous=parent.id if parent else None, manifests=written.objects,
                            index_files=written.index_files, stats=stats, paths=paths,
                            vaultflow_version=__version__)
    rid = repo.commit(record)
    if not repo.config.private_manifests:
        row = {"id": rid, "source": source, "serial": serial, "host": record.host, "started": started,
               "finished": record.finished, "parent": record.parent, "vaultflow_version": __version__,
               **{k: v for k, v in stats.items() if k in manifest.SNAPSHOTS_SCHEMA.names}}
        table = manifest.table_from_rows([{**row, "started": parse_utc(started),
                                           "finished": parse_utc(record.finished)}], manifest.SNAPSHOTS_SCHEMA)
        try:  # derived data for analysts; the record above is the truth
            _write_fresh(repo, manifest.snapshots_name(source, serial), manifest.to_parquet(table))
        except (OSError, VaultflowError) as e:
            get_run_logger().warning("snapshot %s committed, but its row in tables/snapshots failed: %s", rid, e)
    return rid


@task(**TASK)
def verify_snapshot(run: str, snapshot: str, sample: int) -> int:
    """Read back up to `sample` random chunks of the new snapshot and check their keyed hashes."""
    if sample <= 0:
        return 0
    repo = context.get(run).repo
    files = repo.files_table(repo.snapshot(snapshot))
    chunks = pc.list_flatten(files["chunks"]).unique().to_pylist()
    picked = random.sample(chunks, min(sample, len(chunks)))
    for cid in picked:
        repo.load_blob(cid, verify=True)
    return len(picked)
