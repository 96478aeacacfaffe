"""The audit flow: sources against their RPO → chains, witnesses, tombstones → verification coverage → key files →
restore-test history → recommended actions → a markdown artifact and the JSON report.

A critical finding (a source past its RPO, a chain or witness problem, a failed restore test, a damaged record
or key file) fails the run after the artifact is published, so Prefect's notifications fire.
"""

from __future__ import annotations

import time

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from vaultflow.storage.errors import VaultflowError
from vaultflow.tasks import context
from vaultflow.tasks.audit import (
    Action,
    AuditReport,
    audit_chain,
    audit_coverage,
    audit_keys,
    iso,
    parse_duration,
    parse_rpo,
    restore_test_history,
)
from vaultflow.tasks.backup import open_repository


class AuditFailed(VaultflowError):
    def __init__(self, report: AuditReport) -> None:
        self.report = report
        critical = [a.message for a in report.actions if a.level == "critical"]
        super().__init__(f"audit of {report.repository}: {len(critical)} critical findings; first: {critical[0]}")


@flow(name="audit")
def audit(rpo: dict[str, str] | None = None, verified_within: float = 30.0, repository: str | None = None,
          password_secret: str | None = None) -> AuditReport:
    """Answer an auditor's questions about one repository: is each source within its RPO (`rpo`: source →
    duration such as 26h; `*` sets the default, 26h), are the chains whole and the heads witnessed, what did
    retention remove, how much data did `check` read within `verified_within` days, which restore tests passed,
    which key files open it, and what to do next."""
    limits = parse_rpo([f"{k}={v}" for k, v in (rpo or {}).items()])
    now = time.time()
    run = open_repository(repository, password_secret)
    try:
        repo = context.get(run).repo
        url, repo_id = repo.url, repo.config.id
        chain = audit_chain(run, limits, now)
        coverage = audit_coverage(run, verified_within, now)
        keys = audit_keys(run)
    finally:
        context.close(run)
    tests = restore_test_history(chain.snapshot_sources)
    report = AuditReport(repository=url, id=repo_id, generated=iso(now), chain=chain, coverage=coverage,
                         restore_tests=tests, key_files=keys)
    report.actions = recommend(report, now)
    create_markdown_artifact(key=f"audit-{repo_id}", markdown=markdown(report),
                             description=f"vaultflow audit of {url}: {'OK' if report.ok else 'ATTENTION'}")
    if not report.ok:
        raise AuditFailed(report)
    return report


def span(seconds: float) -> str:
    """A duration as people say it: 3 days, 5 hours, 12 minutes."""
    for unit, size in (("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds >= 2 * size:
            return f"{seconds / size:.0f} {unit}"
    return f"{seconds:.0f} seconds"


def recommend(report: AuditReport, now: float) -> list[Action]:
    """What the evidence calls for, critical first; each message names the object and the next step."""
    out: list[Action] = []

    def add(level: str, message: str) -> None:
        out.append(Action(level="critical" if level == "critical" else "advice", message=message))

    chain, cover = report.chain, report.coverage
    for s in chain.sources:
        if s.within_rpo:
            continue
        if s.last_success is None or s.age_seconds is None:
            add("critical", f"source {s.source} has no snapshot (RPO {s.rpo}): run its backup, or drop its --rpo "
                            "if the source is retired")
        else:
            late = span(s.age_seconds - parse_duration(s.rpo))
            add("critical", f"source {s.source} is {late} past its RPO of {s.rpo} (last success {s.last_success}): "
                            "find out why its backups stopped (the backup flow runs in the Prefect UI)")
    for p in chain.chain_problems:
        add("critical", f"hash chain: {p}: run `vaultflow check`; restore missing records from a copy")
    for p in chain.witness_problems:
        add("critical", f"head witness: {p}")
    if chain.damaged_records:
        add("critical", f"{len(chain.damaged_records)} damaged snapshot records: run `vaultflow check`, then "
                        "`vaultflow repair snapshots` to quarantine them")
    for k in report.key_files:
        if k.problem is not None:
            add("critical", f"key file {k.id} is damaged ({k.problem}): remove it with `vaultflow key remove {k.id}`")
    for t in report.restore_tests:
        if t.last_run_ok is False:
            add("critical", f"the last restore test of source {t.source} failed ({t.last_run}): see its "
                            "restore-test artifact, then `vaultflow check --read-data`")
    if cover.problem:
        add("advice", f"verification state: {cover.problem}")
    if cover.never:
        add("advice", f"{cover.never} of {cover.packs} packs never verified: run `vaultflow check "
                      "--read-data-subset K/7` daily with K = 1…7 by weekday (every pack read each week)")
    elif cover.verified < cover.packs:
        add("advice", f"{cover.packs - cover.verified} of {cover.packs} packs not verified within "
                      f"{cover.days:g} days (oldest verification {cover.oldest}): run `vaultflow check "
                      "--read-data-subset K/7` daily")
    live = {s.source for s in chain.sources if s.snapshots}
    for t in report.restore_tests:
        if t.source not in live or t.last_run_ok is False:
            continue
        if t.last_pass is None:
            add("advice", f"source {t.source} has no passing restore test: schedule `vaultflow restore-test`")
        elif now - _seconds(t.last_pass) > cover.days * 86400:
            add("advice", f"source {t.source} last passed a restore test {span(now - _seconds(t.last_pass))} ago: "
                          "schedule `vaultflow restore-test`")
    if sum(1 for k in report.key_files if k.problem is None) == 1:
        add("advice", "one key file opens this repository: add a second password (`vaultflow key add`) and keep it "
                      "apart, so losing one password does not lose the backups")
    return sorted(out, key=lambda a: a.level != "critical")


def _seconds(text: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _cell(value: object) -> str:
    return str(value).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[object]]) -> str:
    if not rows:
        return "(none)"
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join([*lines, *("| " + " | ".join(_cell(c) for c in r) + " |" for r in rows)])


def markdown(report: AuditReport) -> str:
    """The report as the artifact an auditor reads in the Prefect UI."""
    c, cov = report.chain, report.coverage
    actions = "\n".join(f"* {'**critical**: ' if a.level == 'critical' else ''}{a.message}"
                        for a in report.actions) or "none"
    sources = _table(["source", "snapshots", "last serial", "last success (UTC)", "age", "RPO", "status"],
                     [[s.source, s.snapshots, s.last_serial or "", s.last_success or "never",
                       span(s.age_seconds) if s.age_seconds is not None else "", s.rpo,
                       "ok" if s.within_rpo else "PAST RPO"] for s in c.sources])
    tombs = _table(["source", "serial", "reason", "policy", "removed serials", "when (UTC)", "host"],
                   [[t.source, t.serial, t.reason, t.policy, ", ".join(map(str, t.removed)), t.when, t.host]
                    for t in c.tombstones])
    tests = _table(["source", "last run", "result", "last pass", "snapshot", "files", "bytes", "tables"],
                   [[t.source, t.last_run or "never", {True: "pass", False: "FAIL", None: ""}[t.last_run_ok],
                     t.last_pass or "never", t.snapshot, t.files, f"{t.bytes:,}", t.tables]
                    for t in report.restore_tests])
    keys = _table(["key", "created", "host", "user", "state"],
                  [[k.id[:12], k.created, k.host, k.user, f"DAMAGED: {k.problem}" if k.problem else
                    "opened this audit" if k.opened_this_audit else "ok"] for k in report.key_files])
    chain = "\n".join(f"* {p}" for p in [*c.chain_problems, *c.witness_problems, *c.damaged_records]) or \
        "every source's chain is whole and agrees with its witnesses"
    return (f"# Audit of {report.repository}: {'OK' if report.ok else 'ATTENTION'}\n\nrepository {report.id}, "
            f"generated {report.generated}\n\n## Recommended actions\n\n{actions}\n\n## Sources and RPO\n\n{sources}"
            f"\n\n## Hash chains and head witnesses\n\n{chain}\n\nWitnesses consulted: {'; '.join(c.witnesses)}\n\n"
            f"## Tombstones\n\n{tombs}\n\n## Verification coverage\n\n{cov.verified} of {cov.packs} packs read and "
            f"authenticated within {cov.days:g} days ({cov.ratio:.0%}); {cov.never} never; oldest verification "
            f"{cov.oldest or 'none'} (state: {cov.state_file})\n\n## Restore tests\n\n{tests}\n\n"
            f"## Key files\n\n{keys}\n")
