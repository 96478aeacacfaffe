"""Runs in the orchestrator that died: a killed vaultflow process leaves its flow run Running (CLI runs have no
heartbeat); the next run that finds its lock stale marks that run Crashed, naming the process and the finder."""

from __future__ import annotations

import uuid

from prefect import get_run_logger
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import StateType
from prefect.runtime import flow_run
from prefect.states import Crashed

from vaultflow.storage.lock import LockInfo


def current() -> str:
    """The id of the flow run this code runs in ('' outside one)."""
    return str(flow_run.id or "")


def mark_crashed(removed: list[LockInfo]) -> list[str]:
    """Mark as Crashed every still-running flow run whose lock was just found stale; returns their ids."""
    marked: list[str] = []
    runs = [info for info in removed if info.run]
    if not runs:
        return marked
    logger = get_run_logger()
    with get_client(sync_client=True) as client:
        for info in runs:
            try:
                run = client.read_flow_run(uuid.UUID(info.run))
                if run.state is None or run.state.type not in (StateType.RUNNING, StateType.PENDING):
                    continue
                client.set_flow_run_state(run.id, Crashed(message=(
                    f"vaultflow: process {info.pid} on {info.host} ({info.purpose}) died holding its repository "
                    f"lock; found stale by flow run {current() or 'outside Prefect'}")), force=True)
                marked.append(info.run)
            except Exception as e:  # noqa: BLE001 - history is a witness: never fail a backup over it
                logger.warning("could not mark flow run %s as crashed: %s", info.run, e)
    for run_id in marked:
        logger.warning("flow run %s had died holding its lock: marked Crashed", run_id)
    return marked
