"""The config's deployments (backup/<source>, check/, restore-test/, retention/, audit/<repository>), registered
and served from this machine by a Prefect `Runner`: no work pool, no worker, runs in subprocesses of `serve`.

Runs are named for what they do (`backup/docs#2025-01-31T02:00Z`) by `flow.with_options(flow_run_name=…)`. That
survives only `Runner.add_flow`, which keeps the flow object and runs it as is; `prefect.serve(*deployments)`
re-imports the flow from its entrypoint in each run and drops the name (measured on Prefect 3.9.1).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC
from typing import Any

from prefect import flow
from prefect.deployments.runner import RunnerDeployment
from prefect.schedules import Cron, Interval, Schedule
from pydantic import ValidationError

from vaultflow.flows.audit import audit
from vaultflow.flows.backup import backup
from vaultflow.flows.check import check
from vaultflow.flows.forget import forget
from vaultflow.flows.prune import prune
from vaultflow.flows.restore_test import restore_test
from vaultflow.storage.errors import VaultflowError

from .config import Config, Scheduled


def retention_limit(repository_id: str) -> str:
    """The global concurrency limit (limit 1) that keeps retention runs of one repository one at a time."""
    return f"vaultflow-retention-{repository_id}"


@dataclass(frozen=True)
class RunName:
    """A flow run name that says what the run does: `backup/docs#2025-01-31T02:00Z`. `template` is formatted with
    the run's parameters and `when` (its scheduled start, UTC); a missing parameter renders empty, never fails."""

    template: str

    def __call__(self) -> str:
        from prefect.runtime import flow_run

        class Blank(dict[str, Any]):
            def __missing__(self, key: str) -> str:
                return ""

        when = flow_run.get_scheduled_start_time().astimezone(UTC)
        return self.template.format_map(Blank(flow_run.get_parameters(), when=f"{when:%Y-%m-%dT%H:%MZ}"))


@flow(name="retention")
def retention(policy: dict[str, Any], limit: str, prune_after: bool = True, max_unused: str = "5%",
              grace: str = "24h", lock_wait: float = 3600.0, repository: str | None = None,
              password_secret: str | None = None, label: str = "") -> None:
    """`forget` by `policy` (the keep_… rules of flows/forget.py), then `prune`, each its own flow run, while
    holding the global concurrency limit `limit`: one retention run at a time per repository, whoever starts it.
    Strict: a missing limit fails the run instead of running unguarded."""
    from prefect.concurrency.sync import concurrency

    with concurrency(limit, occupy=1, timeout_seconds=lock_wait, strict=True):
        forget.with_options(flow_run_name=RunName(f"forget/{label}#{{when}}"))(
            **policy, repository=repository, password_secret=password_secret, lock_wait=lock_wait)
        if prune_after:
            prune.with_options(flow_run_name=RunName(f"prune/{label}#{{when}}"))(
                max_unused=max_unused, grace=grace, repository=repository, password_secret=password_secret,
                lock_wait=lock_wait)


def schedules(when: Scheduled) -> list[Schedule]:
    interval = when.interval()
    if interval is not None:
        return [Interval(interval, timezone=when.timezone)]
    assert when.cron is not None
    return [Cron(when.cron, timezone=when.timezone)]


@dataclass(frozen=True)
class Served:
    """One deployment: the flow (with its run name) and the options of `to_deployment` / `Runner.add_flow`."""

    flow: Any
    options: dict[str, Any]
    deployment: RunnerDeployment  # built once up front, so a bad schedule fails before anything is registered


def deployment(fn: Any, run_name: str, name: str, what: str, when: Scheduled | list[Schedule],
               **options: Any) -> Served:
    """`fn` as a deployment whose runs are named by `run_name` (a RunName template); a cron line or timezone that
    Prefect refuses is one error naming the config section `what`."""
    named = fn.with_options(flow_run_name=RunName(run_name))
    try:
        options = {"name": name, "schedules": when if isinstance(when, list) else schedules(when), **options}
        return Served(named, options, named.to_deployment(**options))
    except ValidationError as e:
        raise VaultflowError(f"{what}: {e.errors()[0]['msg'].removeprefix('Value error, ')}") from None
    except ValueError as e:
        raise VaultflowError(f"{what}: {e}") from None


def build(cfg: Config, repository_id: str, password_secret: str | None = None) -> list[Served]:
    """Every deployment the config names. `password_secret` (a Prefect Secret block name, else the password comes
    from serve's environment, inherited by the runs) travels as a parameter; the password never does."""
    label = cfg.repository.name or repository_id
    repo = {"repository": cfg.repository.url, "password_secret": password_secret}
    tags = ["vaultflow", f"repository:{label}"]
    out = [deployment(
        backup, "backup/{source}#{when}", s.name, f"source {s.name}", s, tags=[*tags, f"source:{s.name}"],
        description=f"Back up {', '.join(s.paths)} as source {s.name} of {label}; RPO {s.rpo}.",
        parameters={"paths": s.paths, "source": s.name, "excludes": s.exclude, "error_budget": s.error_budget,
                    "lock_wait": s.lock_wait, "task_runner": s.task_runner, **repo}) for s in cfg.sources]
    if (v := cfg.verify) is not None:
        rotation = [Interval(period, anchor_date=first, parameters={"read_data_subset": k})
                    for k, first, period in v.subset_schedules()]
        out.append(deployment(
            check, f"check/{label} {{read_data_subset}}#{{when}}", label, "verify", rotation, tags=tags,
            parameters={"task_runner": v.task_runner, **repo},
            description=f"check --read-data-subset K/{v.subsets} every {v.every}: every pack read once per "
                        f"{v.subsets} runs (K from the clock, counted from {v.anchor:%Y-%m-%d %H:%M %Z})."))
    if (r := cfg.restore_test) is not None:
        out.append(deployment(
            restore_test, f"restore-test/{label}#{{when}}", label, "restore_test", r, tags=tags,
            description="Restore a sample of each source's latest snapshot into scratch and compare.",
            parameters={"sample": r.sample, "everything": r.everything, "task_runner": r.task_runner, **repo}))
    if (t := cfg.retention) is not None:
        out.append(deployment(
            retention, f"retention/{label}#{{when}}", label, "retention", t, tags=tags,
            description=f"forget, then prune{'' if t.prune else ' (off)'}: one at a time per repository.",
            parameters={"policy": t.policy(), "limit": retention_limit(repository_id), "prune_after": t.prune,
                        "max_unused": t.max_unused, "grace": t.grace, "lock_wait": t.lock_wait, "label": label,
                        **repo}))
    if (a := cfg.audit) is not None:
        out.append(deployment(
            audit, f"audit/{label}#{{when}}", label, "audit", a, tags=tags,
            description="Each source against its RPO, chains, witnesses, coverage and restore tests.",
            parameters={"rpo": {s.name: s.rpo for s in cfg.sources}, "verified_within": a.verified_within,
                        **repo}))
    return out


def ensure_retention_limit(repository_id: str) -> str:
    """Create (or reset to 1) the retention limit of this repository; idempotent."""
    from prefect.client.orchestration import get_client

    name = retention_limit(repository_id)
    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(name, 1)
    return name


def refuse_takeover(served: list[Served], repository: str) -> None:
    """Deployment names are per server, not per repository: a config must not silently repoint `backup/docs` of
    another config (another repository) at its own."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        for s in served:
            full = f"{s.deployment.flow_name}/{s.deployment.name}"
            try:
                theirs = client.read_deployment_by_name(full).parameters.get("repository")
            except ObjectNotFound:
                continue
            if theirs != repository:
                raise VaultflowError(f"deployment {full} already serves repository {theirs}: rename this config's "
                                     f"source or [repository] name, or delete it (`prefect deployment delete {full}`)")


def register(served: list[Served]) -> list[str]:
    """Create or update the deployments without serving them (their runs wait for a `serve`); their ids."""
    return [str(s.deployment.apply()) for s in served]


def serve_forever(served: list[Served]) -> None:
    """Register them and run their runs here until SIGTERM or Ctrl-C, which cancel in-flight runs and pause the
    schedules (what `prefect.serve` does, through `Runner.add_flow` so that run names survive)."""
    import asyncio

    from prefect.exceptions import TerminationSignal
    from prefect.runner import Runner

    runner = Runner(pause_on_shutdown=True)
    for s in served:
        runner.add_flow(s.flow, **s.options)
    try:
        asyncio.run(runner.start())
    except (KeyboardInterrupt, TerminationSignal):
        pass
