"""`vaultflow forget`: retention by policy, as a Prefect flow run (flows/forget.py)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from vaultflow.tasks import settings


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    f = sub.add_parser("forget", parents=[common], help="remove snapshots no keep rule keeps (a tombstone in each "
                       "source's chain records it); --prune then frees their data")
    for kind in ("last", "hourly", "daily", "weekly", "monthly", "yearly"):
        f.add_argument(f"--keep-{kind}", type=int, default=0, metavar="N",
                       help="keep the N newest snapshots" if kind == "last" else
                       f"keep the newest snapshot of each of the N most recent {kind.replace('ily', 'y')}s "
                       "that have one")
    f.add_argument("--keep-within", default="", metavar="DURATION",
                   help="keep every snapshot within DURATION (1y2m3d4h) of the source's newest")
    f.add_argument("--keep-tag", action="append", default=[], metavar="TAG", help="keep snapshots tagged TAG")
    f.add_argument("--source", action="append", default=[], metavar="NAME", help="only this source (repeatable)")
    f.add_argument("--dry-run", "-n", action="store_true", help="print what would be removed; change nothing")
    f.add_argument("--prune", action="store_true", help="run prune afterwards to free the removed data")
    f.add_argument("--retry-lock", type=float, default=0.0, metavar="SECONDS",
                   help="wait up to SECONDS for a backup of the same source to finish")
    f.add_argument("--json", action="store_true", help="print the decisions as JSON")
    f.add_argument("--verbose", "-v", action="store_true", help="show Prefect's log lines")
    f.set_defaults(func=cmd_forget)


def cmd_forget(args: argparse.Namespace) -> int:
    from vaultflow import run

    return run._direct(_forget, args)


def _forget(args: argparse.Namespace) -> int:
    from vaultflow import run
    from vaultflow.storage.retention import Policy

    policy = Policy(last=args.keep_last, hourly=args.keep_hourly, daily=args.keep_daily, weekly=args.keep_weekly,
                    monthly=args.keep_monthly, yearly=args.keep_yearly, within=args.keep_within,
                    tags=tuple(args.keep_tag))
    if policy.empty():  # a typo must not page anyone: refused before a flow run exists
        from vaultflow.storage.errors import VaultflowError

        raise VaultflowError("no keep rule given: name at least one --keep-… rule")
    if policy.within:
        from vaultflow.storage.retention import within_delta

        within_delta(policy.within)
    s = settings.resolve(args.repo, args.password_file, args.password_secret)
    runtime = run._prefect(args.verbose)
    run._open_first(s)
    done = run._run(runtime, "forget", "forget", keep_last=args.keep_last, keep_hourly=args.keep_hourly,
                    keep_daily=args.keep_daily, keep_weekly=args.keep_weekly, keep_monthly=args.keep_monthly,
                    keep_yearly=args.keep_yearly, keep_within=args.keep_within, keep_tags=args.keep_tag,
                    sources=args.source, dry_run=args.dry_run, repository=s.url, password_secret=s.password_secret,
                    lock_wait=args.retry_lock)
    if args.json:
        print(json.dumps([d.model_dump() for d in done], indent=1))
    else:
        for d in done:
            print(f"source {d.source}: keep {len(d.kept)}, {'would remove' if args.dry_run else 'removed'} "
                  f"{len(d.removed)}" + (f" (tombstone {d.tombstone[:12]})" if d.tombstone else ""))
            for r in sorted([*d.kept, *d.removed], key=lambda r: -int(r["serial"])):
                what = f"keep   ({r['why']})" if "why" in r else ("remove" if args.dry_run else "removed")
                print(f"  #{r['serial']:<5} {str(r['id'])[:12]}  {r['started']}  {what}")
    if args.prune and not args.dry_run:
        prune = getattr(__import__("vaultflow.prune", fromlist=["cmd_prune"]), "run_after_forget", None)
        if prune is None:
            print("vaultflow: --prune: prune is not available in this version", file=sys.stderr)
            return 1
        return int(prune(args))
    return 0
