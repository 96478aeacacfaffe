"""Prefect tasks of the audit: the evidence an auditor asks for, gathered from the repository, this machine's
state files and the Prefect API's history, then the actions it calls for.

Each task reads; none changes the repository (the local head witness moves up to the heads, as in `check`).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any, Literal

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, Field

from vaultflow.storage.durations import parse_duration
from vaultflow.storage.errors import VaultflowError
from vaultflow.storage.snapshot import SnapshotRecord, chain_problems, forgotten, parse_utc

from . import context, verified, witness

DEFAULT_RPO = "26h"  # a daily backup, with two hours of slack for a slow run
RESTORE_TEST_KEYS = ["restore-test", "restore-test-databases"]


def parse_rpo(specs: list[str]) -> dict[str, str]:
    """`--rpo SOURCE=DURATION` flags as {source: duration}; `*=DURATION` sets the default for every source."""
    out: dict[str, str] = {}
    for spec in specs:
        source, sep, duration = spec.partition("=")
        if not sep or not source.strip():
            raise VaultflowError(f"--rpo {spec!r}: use SOURCE=DURATION (e.g. db=26h), or *=DURATION for every source")
        parse_duration(duration)
        out[source.strip()] = duration.strip()
    return out


class SourceStatus(BaseModel):
    source: str
    snapshots: int
    last_serial: int | None
    last_success: str | None  # the newest snapshot's `finished` (UTC), None: the source has none
    age_seconds: float | None
    rpo: str
    within_rpo: bool


class Tombstone(BaseModel):
    source: str
    serial: int
    id: str
    reason: str  # forget or quarantine
    policy: str
    removed: list[int]  # serials it removed
    when: str
    host: str


class ChainAudit(BaseModel):
    sources: list[SourceStatus]
    chain_problems: list[str]
    damaged_records: list[str]  # "name: why"
    witnesses: list[str]  # which witnesses were consulted
    witness_problems: list[str]
    tombstones: list[Tombstone]
    # 12-character id prefix → source, forgotten records included: how restore-test rows are attributed. Internal
    # to the flow, left out of the JSON report.
    snapshot_sources: dict[str, str] = Field(default_factory=dict, exclude=True)


class CoverageAudit(BaseModel):
    days: float
    packs: int
    verified: int
    never: int
    ratio: float
    oldest: str | None  # UTC time of the least recent verification
    state_file: str
    problem: str | None = None


class RestoreTestStatus(BaseModel):
    source: str
    last_run: str | None = None  # when the newest restore test that covered the source ran
    last_run_ok: bool | None = None
    last_pass: str | None = None
    snapshot: str = ""  # id prefix the last pass restored
    files: int = 0  # files, bytes and tables the last pass proved
    bytes: int = 0
    tables: int = 0


class KeyFile(BaseModel):
    id: str
    created: str
    host: str
    user: str
    problem: str | None
    opened_this_audit: bool


class Action(BaseModel):
    level: Literal["critical", "advice"]
    message: str


class AuditReport(BaseModel):
    repository: str
    id: str
    generated: str
    chain: ChainAudit
    coverage: CoverageAudit
    restore_tests: list[RestoreTestStatus]
    key_files: list[KeyFile]
    actions: list[Action] = []

    @property
    def ok(self) -> bool:
        return not any(a.level == "critical" for a in self.actions)


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def source_statuses(everything: dict[str, SnapshotRecord], rpo: dict[str, str], now: float) -> list[SourceStatus]:
    """Each source's newest snapshot (by serial) against its RPO; a source named only by `rpo` or only by
    tombstones has no snapshot and is past it."""
    gone = forgotten(everything)
    live = [r for rid, r in everything.items() if not r.is_tombstone and rid not in gone]
    names = {r.source for r in everything.values()} | (set(rpo) - {"*"})
    out = []
    for source in sorted(names):
        mine = [r for r in live if r.source == source]
        last = max(mine, key=lambda r: r.serial, default=None)
        limit = rpo.get(source, rpo.get("*", DEFAULT_RPO))
        age = None if last is None else max(0.0, now - parse_utc(last.finished).timestamp())
        out.append(SourceStatus(source=source, snapshots=len(mine), last_serial=last.serial if last else None,
                                last_success=last.finished if last else None, age_seconds=age, rpo=limit,
                                within_rpo=age is not None and age <= parse_duration(limit)))
    return out


def tombstones(everything: dict[str, SnapshotRecord]) -> list[Tombstone]:
    return [Tombstone(source=r.source, serial=r.serial, id=rid, reason=str((r.tombstone or {}).get("reason", "?")),
                      policy=str((r.tombstone or {}).get("policy", "")), removed=sorted(r.removed().values()),
                      when=r.finished, host=r.host)
            for rid, r in sorted(everything.items(), key=lambda kv: (kv[1].source, kv[1].serial)) if r.is_tombstone]


@task(cache_policy=NO_CACHE, persist_result=False)
def audit_chain(run: context.Run, rpo: dict[str, str], now: float) -> ChainAudit:
    """Sources against their RPO, the hash chains, the head witnesses and what tombstones removed."""
    repo = context.get(run).repo
    everything = repo.snapshots(everything=True)
    consulted = witness.consult(repo.config.id, everything)
    prefixes = {rid[:12]: r.source for rid, r in everything.items()}
    prefixes.update({rid[:12]: r.source for r in everything.values() for rid in r.removed()})
    return ChainAudit(sources=source_statuses(everything, rpo, now), chain_problems=chain_problems(everything),
                      damaged_records=[f"{d.name}: {d.reason}" for d in repo.damaged_records.values()],
                      witnesses=consulted.witnesses, witness_problems=[p.message for p in consulted.problems],
                      tombstones=tombstones(everything), snapshot_sources=prefixes)


@task(cache_policy=NO_CACHE, persist_result=False)
def audit_coverage(run: context.Run, days: float, now: float) -> CoverageAudit:
    """How much of the stored data `check` read and authenticated within `days` (tasks/verified.py)."""
    repo = context.get(run).repo
    path = str(verified.state_path(repo.config.id))
    packs = [name for name, _ in repo.backend.list("data")]
    known: dict[str, float] = {}
    problem: str | None = None
    try:
        known = verified.load_verified(repo.config.id)
    except VaultflowError as e:
        problem = str(e)
    c = verified.coverage(known, packs, now, days)
    return CoverageAudit(days=days, packs=c.packs, verified=c.verified, never=c.never, ratio=c.ratio,
                         oldest=iso(c.oldest) if c.oldest is not None else None, state_file=path, problem=problem)


@task(cache_policy=NO_CACHE, persist_result=False)
def audit_keys(run: context.Run) -> list[KeyFile]:
    repo = context.get(run).repo
    return [KeyFile(id=k.id, created=k.created, host=k.host, user=k.username, problem=k.problem,
                    opened_this_audit=k.name == repo.key_name) for k in repo.describe_keys()]


@task(cache_policy=NO_CACHE, persist_result=False)
def restore_test_history(snapshot_sources: dict[str, str]) -> list[RestoreTestStatus]:
    """Per source, the newest restore test and the newest that passed, from the Prefect API's `restore-test`
    artifacts; a row belongs to this repository when its snapshot id prefix is one of this repository's."""
    runs: dict[str, dict[str, Any]] = {}  # flow run → {"when": …, "rows": [(kind, row)]}
    for artifact in _artifacts():
        seen = runs.setdefault(str(artifact.flow_run_id or artifact.id), {"when": "", "rows": []})
        seen["when"] = max(seen["when"], artifact.created.isoformat() if artifact.created else "")
        seen["rows"] += [(artifact.key, row) for row in _rows(artifact.data)]
    status = {s: RestoreTestStatus(source=s) for s in sorted(set(snapshot_sources.values()))}
    for _, got in sorted(runs.items(), key=lambda kv: kv[1]["when"], reverse=True):
        by_source: dict[str, list[tuple[str, dict[str, Any]]]] = {}
        for key, row in got["rows"]:
            source = snapshot_sources.get(str(row.get("snapshot", "")))
            if source is not None:
                by_source.setdefault(source, []).append((key, row))
        for source, rows in by_source.items():
            st, ok = status[source], all(row.get("result") == "pass" for _, row in rows)
            if st.last_run is None:
                st.last_run, st.last_run_ok = got["when"], ok
            if ok and st.last_pass is None:
                files = [row for key, row in rows if key == "restore-test"]
                st.last_pass, st.snapshot = got["when"], str(rows[0][1].get("snapshot", ""))
                st.files, st.bytes = len(files), sum(int(row.get("bytes") or 0) for row in files)
                st.tables = len(rows) - len(files)
    return list(status.values())


def _artifacts() -> list[Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    found: list[Any] = []
    wanted = ArtifactFilter(key=ArtifactFilterKey(any_=RESTORE_TEST_KEYS))
    with get_client(sync_client=True) as client:
        while True:
            page = client.read_artifacts(artifact_filter=wanted, sort=ArtifactSort.CREATED_DESC,
                                         limit=witness.PAGE, offset=len(found))
            found += page
            if len(page) < witness.PAGE:
                return found


def _rows(data: Any) -> list[dict[str, Any]]:
    try:
        rows = json.loads(data) if isinstance(data, str) else data
    except ValueError:
        return []
    return [r for r in rows if isinstance(r, dict)] if isinstance(rows, list) else []
