"""Head witnesses on the Prefect side: publish every commit (local high-water mark, artifact, event), read them
back for `check`. The orchestrator is a witness, not a dependency: failing to reach it never fails a run.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from vaultflow.storage.checker import Problem
from vaultflow.storage.errors import VaultflowError
from vaultflow.storage.snapshot import SnapshotRecord, utc_now
from vaultflow.storage.witness import Finding, Head, LocalWitness, Sighting, compare, repository_heads

from . import context, settings

COMMITTED_EVENT = "vaultflow.snapshot.committed"
PAGE = 200  # the Prefect API's default maximum page size


def local_witness(repository_id: str) -> LocalWitness:
    return LocalWitness(settings.vaultflow_home() / "witness", repository_id)


def artifact_key(repository_id: str, source: str) -> str:
    """`commit-<repository id>-<source slug>`: artifact keys allow lowercase letters, digits and dashes only.

    Two sources may share a slug ("a_b", "A-B"); each version's row names its exact source, so that is harmless.
    """
    return f"commit-{repository_id}-{re.sub(r'[^a-z0-9]+', '-', source.lower()).strip('-')}"


def resource_id(repository_id: str, source: str) -> str:
    return f"vaultflow.source.{repository_id}.{source}"


@task(cache_policy=NO_CACHE, persist_result=False)
def publish_commit(run: context.Run, source: str, serial: int, snapshot: str) -> list[str]:
    """Tell the witnesses about a commit; returns the witnesses that recorded it. Never fails the backup."""
    logger = get_run_logger()
    repo = context.get(run).repo
    repo_id, now = repo.config.id, utc_now()
    recorded = []
    try:
        for fork in local_witness(repo_id).advance({source: Head(serial, snapshot)}, by="backup"):
            logger.error("%s; run `vaultflow check`", fork.message)
        recorded.append("local")
    except (OSError, VaultflowError) as e:
        logger.warning("snapshot %s committed, but this machine's head witness was not updated: %s", snapshot, e)
    try:
        from prefect.artifacts import create_table_artifact
        from prefect.events import emit_event
        from prefect.runtime import flow_run

        row = {"repository": repo_id, "source": source, "serial": serial, "record": snapshot, "committed": now,
               "flow_run": flow_run.get_name() or "", "flow_run_id": flow_run.get_id() or "", "url": repo.url}
        create_table_artifact(table=[row], key=artifact_key(repo_id, source),
                              description=f"vaultflow commit of {source!r} serial {serial} (head witness)")
        emit_event(event=COMMITTED_EVENT, resource={"prefect.resource.id": resource_id(repo_id, source),
                                                    "prefect.resource.name": source},
                   payload=row)
        recorded.append("prefect")
    except Exception as e:  # noqa: BLE001 - the API may be gone; the repository is the truth
        logger.warning("snapshot %s committed, but the Prefect API did not record it as a head witness: %s",
                       snapshot, e)
    return recorded


def prefect_sightings(repository_id: str) -> list[Sighting]:
    """Every commit of this repository the Prefect API recorded (all versions of its `commit-…` artifacts)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    found: list[Sighting] = []
    wanted = ArtifactFilter(key=ArtifactFilterKey(like_=f"commit-{repository_id}-%"))
    with get_client(sync_client=True) as client:
        offset = 0
        while True:
            page = client.read_artifacts(artifact_filter=wanted, sort=ArtifactSort.CREATED_DESC, limit=PAGE,
                                         offset=offset)
            for artifact in page:
                for row in _rows(artifact.data):
                    if row.get("repository") != repository_id:
                        continue
                    run = row.get("flow_run") or "?"
                    run_id = row.get("flow_run_id") or artifact.flow_run_id
                    found.append(Sighting(str(row["source"]), int(row["serial"]), str(row["record"]),
                                          f"committed by flow run {run} ({run_id}) at "
                                          f"{row.get('committed') or artifact.created}"))
            if len(page) < PAGE:
                return found
            offset += PAGE


def _rows(data: Any) -> list[dict[str, Any]]:
    try:
        rows = json.loads(data) if isinstance(data, str) else data
    except ValueError:
        return []
    return [r for r in rows if isinstance(r, dict) and {"source", "serial", "record"} <= r.keys()] \
        if isinstance(rows, list) else []


@dataclass
class Consulted:
    problems: list[Problem] = field(default_factory=list)
    witnesses: list[str] = field(default_factory=list)  # what was consulted, for the report


def consult(repository_id: str, records: dict[str, SnapshotRecord]) -> Consulted:
    """Compare the heads with every reachable witness, then move the local witness up to newer heads."""
    out = Consulted()
    seen: set[tuple[str, str, int, str]] = set()

    def add(findings: list[Finding], witness: str) -> None:
        for f in findings:
            if (f.kind, f.source, f.serial, witness) not in seen:
                seen.add((f.kind, f.source, f.serial, witness))
                out.problems.append(Problem(f.kind, f"source {f.source!r}", f.message))

    local = local_witness(repository_id)
    try:
        state = local.load()
        add(local.findings(records, state), "local")
        add(local.advance(repository_heads(records), by="check"), "local")  # forks seen only now are kept
        out.witnesses.append(f"this machine's witness {local.path} ({len(state.sources)} sources)")
    except VaultflowError as e:  # a damaged witness file no longer proves anything: say so
        out.problems.append(Problem("witness", str(local.path), str(e)))
        out.witnesses.append(f"this machine's witness {local.path}: damaged")
    except OSError as e:
        out.witnesses.append(f"this machine's witness {local.path}: not usable ({e})")
    try:
        sightings = prefect_sightings(repository_id)
    except Exception as e:  # noqa: BLE001 - an unreachable orchestrator is not a check failure
        out.witnesses.append(f"the Prefect API: not reachable ({type(e).__name__}: {e})")
    else:
        add(compare(records, sightings), "prefect")
        out.witnesses.append(f"the Prefect API ({len(sightings)} recorded commits)")
    return out
