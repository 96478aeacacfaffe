"""Prefect tasks of the restore test: pick files, restore them into scratch, compare every byte.

A backup that was never restored is a hope; this turns it into evidence, on a schedule.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile

import pyarrow.compute as pc
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from vaultflow.storage.manifest import raw_paths
from vaultflow.storage.restorer import Restorer, select

from . import context
from .retry import RETRY

TASK = {"cache_policy": NO_CACHE, "persist_result": False}


class Sample(BaseModel):
    snapshot: str
    source: str
    serial: int
    root: str | None  # where the source was read from, if it was a local path
    raw_paths: list[str]  # hex of the exact path bytes (names need not be UTF-8)
    database: bool = False  # a database source's snapshot: restored into a scratch database and counted


class FileCheck(BaseModel):
    snapshot: str
    path: str
    bytes: int
    ok: bool
    compared_with_source: bool
    detail: str


@task(**RETRY, **TASK)
def pick_samples(run: context.Run, snapshot: str | None, sample: int, everything: bool) -> list[Sample]:
    """The latest snapshot of each source (or the one named), and which of its files to restore."""
    repo = context.get(run).repo
    records = repo.snapshots()
    chosen = [repo.find_snapshot(snapshot, records)] if snapshot else \
        [repo.latest(source, records) for source in sorted({r.source for r in records.values()})]
    out = []
    for found in chosen:
        assert found is not None
        rid, record = found
        table = repo.files_table(record)
        files = table.filter(pc.and_(pc.equal(table["type"], "file"), pc.is_valid(table["chunks"])))
        paths = raw_paths(files).to_pylist()
        if not everything:
            paths = sorted(random.sample(paths, min(sample, len(paths))))
        out.append(Sample(snapshot=rid, source=record.source, serial=record.serial,
                          root=record.paths[0] if record.paths else None, raw_paths=[p.hex() for p in paths],
                          database=any(n.startswith("tables/databases/") for n in record.manifests)))
    return out


@task(**TASK)
def restore_and_compare(run: context.Run, sample: Sample) -> list[FileCheck]:
    """Restore the sample into a temporary folder (hashes verified on the way out), then compare with the source
    where it is still there and unchanged. Runs in any process that sees the source's paths."""
    repo = context.repository(run)
    record = repo.snapshot(sample.snapshot)
    table = repo.files_table(record)
    raws = [bytes.fromhex(h) for h in sample.raw_paths]
    wanted = select(table, raws)
    scratch = tempfile.mkdtemp(prefix="vaultflow-restore-test-")
    try:
        result = Restorer(repo, wanted, scratch).run()
        rows = dict(zip(raw_paths(wanted).to_pylist(), wanted.to_pylist(), strict=True))
        return [_compare(sample, rows[raw], scratch, result.failed.get(rows[raw]["path"])) for raw in raws]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _compare(sample: Sample, row: dict, scratch: str, failure: str | None) -> FileCheck:  # type: ignore[type-arg]
    path = row["path"]
    raw = row["raw_path"] or path.encode()
    if failure:
        return FileCheck(snapshot=sample.snapshot, path=path, bytes=row["size"], ok=False,
                         compared_with_source=False, detail=failure)
    restored = os.path.join(os.fsencode(scratch), raw)
    source = os.path.join(os.fsencode(sample.root), raw) if sample.root else None
    try:
        st = os.lstat(source) if source else None
    except OSError:
        st = None
    if st is None or (st.st_size, st.st_mtime_ns) != (row["size"], row["mtime_ns"]):
        return FileCheck(snapshot=sample.snapshot, path=path, bytes=row["size"], ok=True,
                         compared_with_source=False, detail="hashes verified; source changed or gone since")
    same = _same_bytes(restored, source)  # type: ignore[arg-type]
    return FileCheck(snapshot=sample.snapshot, path=path, bytes=row["size"], ok=same, compared_with_source=True,
                     detail="identical to the source" if same else
                     "differs from the source although its size and mtime did not change")


def _same_bytes(a: bytes, b: bytes) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(1 << 20), fb.read(1 << 20)
            if x != y:
                return False
            if not x:
                return True
