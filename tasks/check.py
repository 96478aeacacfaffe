"""Prefect tasks of `check`: structure once, data over batches of packs, head witnesses, then what the damage
affects.

The Checker (with the index it rebuilt from storage) lives in tasks.context between tasks.
"""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from vaultflow.storage.checker import Checker, read_packs

from . import context, witness

TASK = {"cache_policy": NO_CACHE, "persist_result": False}


class StructureResult(BaseModel):
    problems: int
    pack_batches: list[list[str]]


@task(**TASK)
def check_structure(run: context.Run, read_data: bool, subset: str | None,
                    packs_per_batch: int = 16) -> StructureResult:
    state = context.get(run)
    checker = state.checker = Checker(state.repo)
    checker.structure()
    packs = checker.select_packs(subset) if read_data or subset else []
    return StructureResult(problems=len(checker.report.problems),
                           pack_batches=[packs[i:i + packs_per_batch] for i in range(0, len(packs), packs_per_batch)])


class PacksRead(BaseModel):
    packs: int
    bytes: int
    damaged: list[tuple[str, str]]  # (pack, what is wrong)


@task(**TASK)
def check_packs(run: context.Run, packs: list[str]) -> PacksRead:
    """Read and authenticate every byte of these packs, in whatever process or machine the runner chose."""
    damaged, nbytes = read_packs(context.repository(run), packs)
    return PacksRead(packs=len(packs), bytes=nbytes, damaged=damaged)


def record_packs(run: context.Run, read: PacksRead) -> None:
    """Merge one batch's findings into the flow's checker (in the flow's process)."""
    checker = context.get(run).checker
    assert checker is not None
    checker.record_read(read.packs, read.bytes, read.damaged)


class WitnessResult(BaseModel):
    problems: int
    consulted: list[str]  # which witnesses were asked, for the report


@task(**TASK)
def check_witnesses(run: context.Run) -> WitnessResult:
    """Compare each source's head with the witnesses outside the repository (rollbacks and forks)."""
    state = context.get(run)
    checker = state.checker
    assert checker is not None
    found = witness.consult(state.repo.config.id, checker.records)
    checker.report.problems.extend(found.problems)
    return WitnessResult(problems=len(found.problems), consulted=found.witnesses)


@task(**TASK)
def check_affected(run: context.Run) -> dict:  # type: ignore[type-arg]
    checker = context.get(run).checker
    assert checker is not None
    checker.affected()
    return checker.report.to_dict()
