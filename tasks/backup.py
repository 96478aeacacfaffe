"""Prefect tasks of a backup run: thin wrappers over storage/, passing only small metadata between them.

Bulk data stays in the process (tasks.context) and on local scratch (Arrow IPC files).
"""

from __future__ import annotations

import os
import random
import socket
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from vaultflow import __version__
from vaultflow.storage import archiver, manifest
from vaultflow.storage.errors import ObjectExists, ObjectMissing, VaultflowError
from vaultflow.storage.index import Index
from vaultflow.storage.repository import Repository
from vaultflow.storage.snapshot import SnapshotRecord, parse_utc

from . import context, settings, witness
from .retry import RETRY
from .sources import SourceSpec
from .sources import for_paths as source_for
from .sources import reader as source_reader

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
def open_repository(repository: str | None, password_secret: str | None) -> context.Run:
    """Open the repository once for the run in the flow's process. The returned `Run` names the repository and
    where the password comes from (never the password): mapped tasks elsewhere open it from that."""
    s = settings.resolve(repository, None, password_secret)
    repo = context.take_preopened(s.url) or Repository.open(s.url, s.password(), storage_options=s.storage_options)
    get_run_logger().info("opened repository %s at %s", repo.config.id, settings.redact(repo.url))
    return context.register(repo, s.password_file, s.password_secret)


class Lineage(BaseModel):
    parent: Parent | None  # the latest good snapshot of the source: change detection compares against it
    serial: int  # the new snapshot's serial: above every record of the source, damaged ones included
    previous: str | None  # the record of serial - 1 as far as anyone saw it: the chain's link


@task(**TASK)
def find_lineage(run: context.Run, source: str) -> Lineage:
    """The latest snapshot of `source` by serial (change detection compares against its manifest), and the
    serial and chain link of the new one: never a serial that a damaged record or this machine's witness
    already saw, so a rolled-back or damaged head leaves a gap that check reports, never a fork."""
    repo = context.get(run).repo
    records = repo.snapshots()
    latest = repo.latest(source, records)
    serial = repo.next_serial(source, records)
    chain = repo.chain_head(source)  # a tombstone, when a forget came last: the chain links through it
    previous = chain[0] if chain else None
    claimed = [(d.serial, rid) for rid, d in repo.damaged_records.items() if d.source == source and d.serial]
    if claimed and max(claimed)[0] == serial - 1:
        previous = max(claimed)[1]
    try:
        head = witness.local_witness(repo.config.id).load().sources.get(source)
    except VaultflowError:
        head = None  # a damaged witness file is check's to report
    if head is not None and head.serial >= serial:
        get_run_logger().warning(
            "source %s: this machine's witness saw serial %s (record %s), but the repository's newest is %s: it "
            "was rolled back; this snapshot takes serial %s so that it forks nothing; run `vaultflow check`",
            source, head.serial, head.id[:12], serial - 1, head.serial + 1)
        serial, previous = head.serial + 1, head.id
    if latest is None:
        return Lineage(parent=None, serial=serial, previous=previous)
    rid, rec = latest
    started = parse_utc(rec.started)
    return Lineage(parent=Parent(id=rid, serial=rec.serial,
                                 started_ns=int(started.timestamp()) * 10**9 + started.microsecond * 1000),
                   serial=serial, previous=previous)


class ListingInfo(BaseModel):
    """What `discover` found; the listing itself stays on local scratch."""

    source: SourceSpec  # how any worker reads the entries
    listing: str
    entries: int
    files: int
    bytes: int
    errors: list[tuple[str, str]]  # (hex of the exact path bytes, message): names need not be UTF-8


@task(**TASK)
def discover(run: context.Run, paths: list[str], excludes: list[str]) -> ListingInfo:
    """List what the source holds into an Arrow listing on the run's scratch. The source's capture stays open
    until the run ends: a database source holds its consistent snapshot (and has counted rows inside it)."""
    state = context.get(run)
    src = source_for(paths)
    cap = state.holds.enter_context(src.capture(state.scratch, excludes))
    spec = src.spec(cap)
    context.write_ipc(cap.listing, state.scratch / "listing.arrow")
    if cap.tables:
        context.write_ipc(pa.Table.from_pylist(cap.tables, schema=manifest.DATABASES_SCHEMA),
                          state.scratch / "tables-capture.arrow")
    files = cap.listing.filter(pc.equal(cap.listing["type"], "file"))
    if spec.streams:
        get_run_logger().info("%s: %d streams in one consistent capture", spec.url, files.num_rows)
    return ListingInfo(source=spec, listing=str(state.scratch / "listing.arrow"), entries=cap.listing.num_rows,
                       files=files.num_rows, bytes=int(pc.sum(files["size"]).as_py() or 0),
                       errors=[(p.hex(), m) for p, m in cap.errors])


@task(**TASK)
def plan_changes(run: context.Run, listing_path: str, parent: Parent | None, full: bool, streams: bool = False,
                 batch_bytes: int = 64 << 20, batch_files: int = 2048) -> Plan:
    """Join the listing with the parent manifest; write the plan and the files to read to scratch. A stream
    source's entries are always read (`streams`): nothing but their content says whether they changed."""
    state = context.get(run)
    listing = context.read_ipc(listing_path)
    parent_files = state.repo.files_table(state.repo.snapshot(parent.id)) if parent else None
    plan = archiver.plan_changes(listing, parent_files, parent.started_ns if parent else 0, full or streams)
    plan = _reread_lost(plan, state.repo.index)
    to_read = plan.filter(plan["read"])
    context.write_ipc(plan, state.scratch / "plan.arrow")
    context.write_ipc(to_read, state.scratch / "read.arrow")
    sizes = to_read["size"].to_pylist()
    files = plan.filter(pc.equal(plan["type"], "file"))
    # Streams have no size to balance by: one per batch, so several dumps run side by side
    ranges = [(i, i + 1) for i in range(len(sizes))] if streams else archiver.batches(sizes, batch_bytes, batch_files)
    return Plan(batches=ranges, files=files.num_rows,
                files_to_read=to_read.num_rows, bytes_total=int(pc.sum(files["size"]).as_py() or 0),
                bytes_to_read=sum(sizes), entries=plan.num_rows)


def _reread_lost(plan: pa.Table, index: Index) -> pa.Table:
    """Unchanged files with a chunk the index no longer has (its pack was lost from storage, see
    Repository.forget_lost_packs) are read again: the new snapshot must not copy references to lost data."""
    kept = pc.invert(plan["read"])
    chunks = pc.if_else(kept, plan["chunks"], pa.nulls(plan.num_rows, plan["chunks"].type))
    flat = pc.list_flatten(chunks)
    if not len(flat):
        return plan
    present = np.array(index.contains_many(flat.to_pylist()), bool)
    if present.all():
        return plan
    rows = np.unique(np.asarray(pc.list_parent_indices(chunks))[~present])
    reread = np.zeros(plan.num_rows, bool)
    reread[rows] = True
    return plan.set_column(plan.column_names.index("read"), "read", pc.or_(plan["read"], pa.array(reread)))


class BatchResult(BaseModel):
    """What one batch hands back: small metadata only (its file data went into packs in the repository)."""

    start: int  # the batch's first row in the files to read: results are put back in order
    results: bytes  # Arrow IPC of archiver.RESULT_SCHEMA, one row per file: hashes and chunk lists
    index_files: list[str]  # the index files this batch wrote for its packs (durable before it returned)
    blob_ids: bytes  # the ids of the blobs it stored, 32 bytes each: two workers may store the same one
    stats: dict[str, int]
    tables: bytes = b""  # Arrow IPC of manifest.DATABASES_SCHEMA: row counts a stream source learnt while read


def batch_files(read: pa.Table, start: int, end: int) -> bytes:
    """One batch's file list, as the mapped task receives it: keys, display paths and listed identities."""
    return context.table_to_bytes(read.slice(start, end - start).select(["key", "path", "dev", "inode"]))


@task(**RETRY, **TASK)
def process_batch(run: context.Run, source: SourceSpec, start: int, files: bytes) -> BatchResult:
    """Read, chunk, hash, compress, encrypt and pack one batch of files (or streams), in whatever process or
    machine the task runner chose. The batch has its own write session: its last pack is uploaded and its index
    file written before it returns, so nothing it stored depends on another process."""
    repo = context.repository(run)
    read = context.table_from_bytes(files)
    remote = source_reader(source)
    idents = None if remote else list(zip(read["dev"].to_pylist(), read["inode"].to_pylist(), strict=True))
    keys = read["key"].to_pylist()
    session = repo.write_session()
    try:
        results, stats = archiver.archive_files(repo, session, source.root, keys, remote, idents)
        session.flush()
        index_files = session.write_index()
    finally:
        session.close()
    tables = [row for key in keys for row in remote.tables(key)] if remote is not None and remote.streams else []
    if stats.errors:
        logger = get_run_logger()
        for path, err in zip(read["path"].to_pylist(), results["error"].to_pylist(), strict=True):
            if err:
                logger.warning("%s: %s", path, err)
    s = session.stats
    return BatchResult(start=start, results=context.table_to_bytes(results), index_files=index_files,
                       blob_ids=b"".join(session.blob_ids),
                       stats={**stats.__dict__, "blobs_new": s.blobs_new, "bytes_added": s.bytes_new_raw,
                              "bytes_stored": s.bytes_new_stored, "packs_uploaded": s.packs_uploaded},
                       tables=context.table_to_bytes(pa.Table.from_pylist(tables, schema=manifest.DATABASES_SCHEMA))
                       if tables else b"")


def keep_results(run: context.Run, done: list[BatchResult]) -> dict[str, int]:
    """Put the batches' results on the flow's scratch for write_manifest; returns their summed stats, with the
    blobs that more than one batch stored counted as `blobs_duplicate` (prune removes the extra copies)."""
    scratch = context.get(run).scratch
    totals: dict[str, int] = {}
    ids: set[bytes] = set()
    stored = 0
    for b in done:
        context.write_ipc(context.table_from_bytes(b.results), scratch / f"result-{b.start:012d}.arrow")
        if b.tables:
            context.write_ipc(context.table_from_bytes(b.tables), scratch / f"tables-{b.start:012d}.arrow")
        for k, v in b.stats.items():
            totals[k] = totals.get(k, 0) + v
        ids.update(b.blob_ids[i:i + 32] for i in range(0, len(b.blob_ids), 32))
        stored += len(b.blob_ids) // 32
    totals["blobs_duplicate"] = stored - len(ids)
    return totals


@task(**RETRY, **TASK)
def write_manifest(run: context.Run, source: str, serial: int, discover_errors: list[tuple[str, str]],
                   batch_index_files: list[str]) -> Manifest:
    """Upload the flow's own last packs and index, verify every referenced chunk is indexed, then write manifests.

    `discover_errors` are (hex of the exact path bytes, message) from the listing; `batch_index_files` the index
    files the batches wrote.
    """
    state = context.get(run)
    repo, session = state.repo, state.session
    assert session is not None
    session.flush()
    index_files = sorted(set(session.write_index()) | set(batch_index_files))
    plan = context.read_ipc(state.scratch / "plan.arrow")
    read_rows = plan.filter(plan["read"])
    parts = sorted(state.scratch.glob("result-*.arrow"))
    results = pa.concat_tables([context.read_ipc(p) for p in parts]) if parts \
        else archiver.RESULT_SCHEMA.empty_table()
    files = archiver.files_table(plan, read_rows, results)
    chunks = pc.list_flatten(files["chunks"]).unique()
    _verify_indexed(repo, chunks.to_pylist(), run.lost_packs)

    objects = dict([_write_sealable(repo, manifest.files_name, source, serial, manifest.to_parquet(files))])
    tables = [context.read_ipc(p) for p in sorted(state.scratch.glob("tables-*.arrow"))]
    if tables:  # per-table evidence of a database source: authenticated through the record like the files
        data = manifest.to_parquet(pa.concat_tables(tables).sort_by([("stream", "ascending"), ("table", "ascending")]))
        objects.update([_write_sealable(repo, manifest.databases_name, source, serial, data)])
    errors = manifest.errors_table(files, [(bytes.fromhex(h), m) for h, m in discover_errors])
    if errors.num_rows and not repo.config.private_manifests:
        edata = manifest.to_parquet(errors)
        ename = manifest.content_named(manifest.errors_name(source, serial), edata)
        objects[ename] = repo.write_object(ename, edata)
    is_file = pc.equal(files["type"], "file")
    status = files.filter(is_file)["status"].value_counts().to_pylist()
    counts = {f"files_{k}": 0 for k in ("new", "changed", "unchanged", "error")}
    counts.update({f"files_{d['values']}": int(d["counts"]) for d in status})
    stats = {"entries": files.num_rows, "files": int(pc.sum(is_file).as_py() or 0),
             "bytes": int(pc.sum(pc.if_else(is_file, files["size"], 0)).as_py() or 0),
             "errors": errors.num_rows, **counts}
    return Manifest(objects=objects, index_files=index_files, stats=stats, chunks=len(chunks))


def _write_sealable(repo: Repository, base: Callable[[str, int, bool], str], source: str, serial: int,
                    data: bytes) -> tuple[str, str]:
    """Write a manifest object named in the record: (name, digest). Private manifests are sealed and named by a
    fresh salt (a name must not confirm a guessed manifest); others by their content."""
    if repo.config.private_manifests:
        salt = os.urandom(32)
        name = manifest.content_named(base(source, serial, True), salt)
        data = manifest.seal_manifest(repo.master.manifest_key, salt, data, name)
    else:
        name = manifest.content_named(base(source, serial, False), data)
    return name, repo.write_object(name, data)


def _verify_indexed(repo: Repository, chunk_ids: list[bytes], lost_packs: tuple[str, ...]) -> None:
    """Every chunk the manifest references must be in the index as stored (not just in memory: the batches
    wrote their index files in other processes, perhaps on other machines), and not only in a lost pack.
    The repository then uses that index (verify_snapshot reads through it)."""
    fresh = repo.build_index()
    if lost_packs:
        fresh.drop_packs(set(lost_packs))
    missing = [c for c, ok in zip(chunk_ids, fresh.contains_many(chunk_ids), strict=True) if not ok]
    if missing:
        raise ObjectMissing(f"{len(missing)} chunks referenced by the new manifest are in no index file "
                            f"(first: {missing[0].hex()}); the snapshot was not committed")
    repo.use_index(fresh)


@task(**RETRY, **TASK)
def commit_snapshot(run: context.Run, source: str, serial: int, parent: Parent | None, previous: str | None,
                    started: str, finished: str, paths: list[str], written: Manifest, stats: dict[str, int]) -> str:
    """Write the snapshot record: the commit point. Returns the snapshot id.

    Idempotent: the record's content is fixed by the parameters (the flow takes `finished` before calling), so
    a retry after an attempt that wrote the record and then failed writes the same object and succeeds,
    instead of forking the chain with a second record of the same serial. The source lock is proven held
    immediately before the write (a fencing check): a holder that lost it commits nothing.
    """
    state = context.get(run)
    repo = state.repo
    record = SnapshotRecord(source=source, serial=serial, started=started, finished=finished,
                            host=socket.gethostname(), parent=parent.id if parent else None,
                            previous=previous, manifests=written.objects,
                            index_files=written.index_files, stats=stats, paths=paths,
                            vaultflow_version=__version__)
    if state.lock is not None:
        state.lock.verify()
    rid = repo.commit(record)
    if not repo.config.private_manifests:
        try:  # derived data for analysts; the record above is the truth
            _write_snapshot_row(repo, rid, record)
        except (OSError, VaultflowError) as e:
            get_run_logger().warning("snapshot %s committed, but its row in tables/snapshots failed: %s", rid, e)
    return rid


def _write_snapshot_row(repo: Repository, rid: str, record: SnapshotRecord) -> None:
    """One row of tables/snapshots, written once: an existing row must be this very one (a retried commit)."""
    data = manifest.to_parquet(manifest.snapshot_row(rid, record))
    name = manifest.snapshots_name(record.source, record.serial)
    try:
        repo.backend.write(name, data)
    except ObjectExists:
        if repo.backend.read(name) != data:
            raise ObjectExists(f"{name} already holds another snapshot's row (two records of serial "
                               f"{record.serial}?); run `vaultflow check`") from None


@task(**TASK)
def verify_snapshot(run: context.Run, snapshot: str, sample: int) -> int:
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
