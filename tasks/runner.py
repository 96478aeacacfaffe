"""Where a flow's mapped tasks run: threads of the flow's process, worker processes of this machine, or a Dask
cluster. One runbook, three runners; the flow chooses after planning, when it knows how much work there is.

`task_runner` (a flow parameter, `--task-runner` on the CLI, a deployment setting):
- `auto` (default): worker processes where measured to pay (a backup reading many files), threads otherwise;
- `threads`: the flow's own thread pool (hashing, zstd and AES release the GIL, but Python's share does not);
- `processes`: Prefect's ProcessPoolTaskRunner, one worker process per core (spawned: ~3 s to start here);
- `dask://HOST:PORT` (or `tcp://…`): an existing Dask scheduler; its workers must import vaultflow and reach
  the sources, the repository and, for restores, the target (see README, "Running on a Dask cluster").

Threads: one task per core. Measured on 2 cores, a second task per core made a backup slower (6.2 s instead
of 5.9 s for 1.47 GB) and 150 MB larger; VAULTFLOW_WORKERS overrides (raise it for high-latency object
stores, where tasks wait on the network).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from prefect.futures import PrefectFuture, as_completed
from prefect.task_runners import ProcessPoolTaskRunner, TaskRunner, ThreadPoolTaskRunner

from vaultflow.storage.errors import VaultflowError

# When `auto` takes worker processes, measured side by side on this project's bench data (2 cores; numbers in
# docs/startup.md, "Task runners"). Spawning the pool costs ~3 s (imports, one key derivation per worker), and
# the C work (zstd, BLAKE3, AES-GCM) already runs in parallel on threads; what processes parallelise is Python's
# per-file work. A backup of 200,000 small files took 31.5 s on processes against 52.3 s on threads, while a
# 1.5 GB first backup of few large files took 12.4-13.0 s on processes and 8.8-10.1 s on threads. So a backup
# takes processes by the number of files it reads; check (3.4 s threads vs 6.3 s processes for 1.5 GB) and
# restore (6.8 vs 12.6 s; 20,000 small files 3 s vs 10-17 s) never do unless asked.
BACKUP_PROCESSES_FROM_FILES = 32_768
ENV_RUNNER = "VAULTFLOW_TASK_RUNNER"

__all__ = ["BACKUP_PROCESSES_FROM_FILES", "as_completed", "choose", "map_tasks", "pool", "thread_runner",
           "workers"]


def workers(per_core: int = 1) -> int:
    configured = os.environ.get("VAULTFLOW_WORKERS", "")
    if configured.isdigit() and int(configured) > 0:
        return int(configured)
    return per_core * (os.cpu_count() or 1)


def thread_runner(per_core: int = 1) -> ThreadPoolTaskRunner:  # type: ignore[type-arg]
    return ThreadPoolTaskRunner(max_workers=workers(per_core))


def choose(spec: str | None, planned: int = 0, pays_from: int | None = None) -> str:
    """`threads`, `processes` or a Dask address, from the flow parameter (or VAULTFLOW_TASK_RUNNER) and the
    planned work: `auto` takes processes when `planned` (files, say) reaches `pays_from`, never without one."""
    if not spec or spec == "auto":  # the flow's default defers to the machine's setting
        spec = os.environ.get(ENV_RUNNER) or "auto"
    spec = spec.strip()
    if spec == "auto":
        return "processes" if pays_from is not None and planned >= pays_from and workers() > 1 else "threads"
    if spec in ("threads", "processes"):
        return spec
    if spec.startswith(("dask://", "tcp://", "tls://")):
        return "tcp://" + spec.removeprefix("dask://") if spec.startswith("dask://") else spec
    raise VaultflowError(f"task runner {spec!r}: use auto, threads, processes, or dask://HOST:PORT")


@contextlib.contextmanager
def pool(spec: str | None, planned: int = 0,
         pays_from: int | None = None) -> Iterator[TaskRunner | None]:  # type: ignore[type-arg]
    """A started task runner for the mapped tasks, or None for the flow's own thread pool."""
    chosen = choose(spec, planned, pays_from)
    if chosen == "threads":
        yield None
        return
    runner: TaskRunner  # type: ignore[type-arg]
    if chosen == "processes":
        runner = ProcessPoolTaskRunner(max_workers=workers())
    else:
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError:
            raise VaultflowError("a Dask task runner needs prefect-dask: pip install 'vaultflow[dask]'") from None
        runner = DaskTaskRunner(address=chosen)
    with runner:
        yield runner


def map_tasks(runner: TaskRunner | None, task: Any, **parameters: Any) -> list[PrefectFuture[Any]]:  # type: ignore[type-arg]
    """`task.map(**parameters)` on `runner` (None: the flow's own task runner)."""
    if runner is None:
        return list(task.map(**parameters))
    return list(runner.map(task, parameters))
