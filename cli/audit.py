"""`vaultflow audit`: one repository's evidence for an auditor, as a Prefect flow run (flows/audit.py) that reads
the Prefect API's restore-test history; prints the report (markdown, or JSON with --json)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from vaultflow.tasks import settings


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("audit", parents=[common], help="report each source's last success against its RPO, hash "
                       "chains and head witnesses, tombstones, verification coverage, restore tests and key files, "
                       "with recommended actions (a markdown artifact in the Prefect UI)")
    p.add_argument("--rpo", action="append", default=[], metavar="SOURCE=DURATION",
                   help="recovery point objective of SOURCE (e.g. db=26h, files=1d12h; *=DURATION for every "
                        "source; default 26h); a source past it is a critical finding (repeatable)")
    p.add_argument("--verified-within", type=float, default=30.0, metavar="DAYS",
                   help="coverage counts packs `check` read in the last DAYS days; a restore test older than that "
                        "is stale (default 30)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--verbose", "-v", action="store_true", help="show Prefect's log lines")
    p.set_defaults(func=cmd_audit)


def cmd_audit(args: argparse.Namespace) -> int:
    from vaultflow import run

    return int(run._direct(_audit, args))


def _audit(args: argparse.Namespace) -> int:
    from vaultflow import run
    from vaultflow.storage.errors import VaultflowError

    if not args.verified_within > 0:
        raise VaultflowError(f"--verified-within {args.verified_within}: give a positive number of days")
    s = settings.resolve(args.repo, args.password_file, args.password_secret)
    runtime = run._prefect(args.verbose)  # before anything imports prefect
    from vaultflow.flows.audit import AuditFailed, markdown
    from vaultflow.tasks.audit import parse_rpo

    rpo = parse_rpo(args.rpo)  # a typo is refused before a flow run exists (it would page someone)
    run._open_first(s)
    try:
        report = run._run(runtime, "audit", "audit", rpo=rpo, verified_within=args.verified_within,
                          repository=s.url, password_secret=s.password_secret)
    except AuditFailed as e:
        report = e.report
    if args.json:
        print(json.dumps({**report.model_dump(mode="json"), "ok": report.ok}, indent=1))
    else:
        from .show import safe

        print("\n".join(safe(line) for line in markdown(report).splitlines()))
    return 0 if report.ok else 1
