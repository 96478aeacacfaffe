"""Prefect tasks of `check`: structure once, data over batches of packs, head witnesses, then what the damage
affects.

The Checker (with the index it rebuilt from storage) lives in tasks.context between tasks.
"""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from vaultflow.storage.checker import Checker

from . import context, witness

TASK = {"cache_policy": NO_CACHE, "persist_result": False}


class StructureResult(BaseModel):
    problems: int
    pack_batches: list[list[str]]


@task(**TASK)
def check_structure(run: str, read_data: bool, subset: str | None, packs_per_batch: int = 16) -> StructureResult:
    state = context.get(run)
    checker = state.checker = Checker(state.repo)
    checker.structure()
    packs = checker.select_packs(subset) if read_data or subset else []
    return StructureResult(problems=len(checker.report.problems),
                           pack_batches=[packs[i:i + packs_per_batch] for i in range(0, len(packs), packs_per_batch)])


@task(**TASK)
def check_packs(run: str, packs: list[str]) -> int:
    """Read and authenticate every byte of these packs; returns how many were damaged."""
    checker = context.get(run).checker
    assert checker is not None
    return len(checker.read_packs(packs))


class WitnessResult(BaseModel):
    problems: int
    consulted: list[str]  # which witnesses were asked, for the report


@task(**TASK)
def check_witnesses(run: str) -> WitnessResult:
    """Compare each source's head with the witnesses outside the repository (rollbacks and forks)."""
    state = context.get(run)
    checker = state.checker
    assert checker is not None
    found = witness.consult(state.repo.config.id, checker.records)
    checker.report.problems.extend(found.problems)
    return WitnessResult(problems=len(found.problems), consulted=found.witnesses)


@task(**TASK)
def check_affected(run: str) -> dict:  # type: ignore[type-arg]
    checker = context.get(run).checker
    assert checker is not None
    checker.affected()
    return checker.report.to_dict()
