"""The check flow: structure → read packs (mapped batches) → head witnesses → what the damage affects → report.

It holds a shared repository lock throughout (prune, exclusive, waits); a problem fails the run, so Prefect's
failure notifications fire.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, unmapped
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from vaultflow.storage.errors import VaultflowError
from vaultflow.tasks import context, runner, runs, verified
from vaultflow.tasks.backup import open_repository
from vaultflow.tasks.check import check_affected, check_packs, check_structure, check_witnesses, record_packs


class CheckFailed(VaultflowError):
    def __init__(self, report: dict[str, Any]) -> None:
        self.report = report
        first = report["problems"][0]
        super().__init__(f"check found {len(report['problems'])} problems; first: {first['object']}: "
                         f"{first['message']}")


@flow(name="check", task_runner=runner.thread_runner())
def check(read_data: bool = False, read_data_subset: str | None = None, repository: str | None = None,
          password_secret: str | None = None, task_runner: str = "auto") -> dict[str, Any]:
    """Verify the repository's structure and, with read_data or a subset (`N%`, `K/N`), its bytes; pack batches
    are read where `task_runner` says (auto, threads, processes or dask://HOST:PORT)."""
    run = open_repository(repository, password_secret)
    try:
        with context.get(run).repo.lock(purpose="check", run=runs.current()) as lock:
            runs.mark_crashed(lock.removed)
            structure = check_structure(run, read_data, read_data_subset)
            with runner.pool(task_runner) as pool:
                for future in runner.as_completed(runner.map_tasks(pool, check_packs, run=unmapped(run),
                                                                   packs=structure.pack_batches)):
                    record_packs(run, future.result())
            verified.record_check(context.get(run).checker, structure.pack_batches)  # for audit and metrics
            witnesses = check_witnesses(run)
            report = check_affected(run)
    finally:
        context.close(run)
    report["witnesses"] = witnesses.consulted
    rows = [{"kind": p["kind"], "object": p["object"], "problem": p["message"],
             "snapshots": ", ".join(s[:12] for s in p["snapshots"]), "files": ", ".join(p["files"][:10])}
            for p in report["problems"]]
    summary = (f"{report['snapshots']} snapshots, {report['index_files']} index files, {report['packs']} packs, "
               f"{report['chunks']} chunks; {report['packs_read']} packs read ({report['bytes_read']:,} bytes)")
    consulted = "Head witnesses consulted: " + "; ".join(witnesses.consulted)
    notices = "".join(f"\n* notice: {n['object']}: {n['message']}" for n in report["notices"])
    create_markdown_artifact(key="check-report", markdown=f"# Check: {'OK' if report['ok'] else 'PROBLEMS'}\n\n"
                             f"{summary}\n\n{consulted}\n\n"
                             + "\n".join(f"* **{r['object']}**: {r['problem']}" for r in rows) + notices)
    if rows:
        create_table_artifact(key="check-problems", table=rows, description=f"{summary}. {consulted}")
        raise CheckFailed(report)
    return report
