"""`vaultflow prune`: free the data no snapshot references, as a Prefect flow run (flows/prune.py)."""

from __future__ import annotations

import argparse
from typing import Any

from vaultflow.tasks import settings


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("prune", parents=[common], help="free the data no snapshot references: unused packs become "
                       "deletion candidates; a later prune past --grace deletes those still unused")
    p.add_argument("--dry-run", "-n", action="store_true",
                   help="print the plan and the bytes it would free; change nothing")
    p.add_argument("--max-unused", default="5%", metavar="LIMIT",
                   help="repack partly used packs until unused data is at most LIMIT: N%% of the kept packs' "
                        "data (default 5%%), a size such as 500M, or unlimited (restic's meaning)")
    p.add_argument("--grace", default="24h", metavar="DURATION",
                   help="how long a deletion candidate waits before a prune may delete it (default 24h; "
                        "s, m, h, d): a backup that loaded the index before it became a candidate has that long "
                        "to commit")
    p.add_argument("--retry-lock", type=float, default=0.0, metavar="SECONDS",
                   help="wait up to SECONDS for backups, checks and restores holding the repository to finish "
                        "(default: fail at once, naming the holder)")
    p.add_argument("--verbose", "-v", action="store_true", help="show Prefect's log lines")
    p.set_defaults(func=cmd_prune)


def cmd_prune(args: argparse.Namespace) -> int:
    from vaultflow import run

    return int(run._direct(_prune, args))


def run_after_forget(args: argparse.Namespace) -> int:
    """`forget --prune`: a prune with the default limits, waiting for the lock as long as the forget did."""
    return _prune(argparse.Namespace(**{**vars(args), "dry_run": False, "max_unused": "5%", "grace": "24h"}))


def _prune(args: argparse.Namespace) -> int:
    from vaultflow import run
    from vaultflow.storage.prune import parse_duration, parse_max_unused

    parse_duration(args.grace)  # typos are refused before a flow run exists (it would page someone)
    parse_max_unused(args.max_unused)
    s = settings.resolve(args.repo, args.password_file, args.password_secret)
    runtime = run._prefect(args.verbose)
    run._open_first(s)
    summary = run._run(runtime, "prune", "prune", dry_run=args.dry_run, max_unused=args.max_unused, grace=args.grace,
                       repository=s.url, password_secret=s.password_secret, lock_wait=args.retry_lock)
    if args.dry_run:
        print("dry run: nothing was changed")
    run._print_rows(summary.rows())
    if args.dry_run:
        print(f"would free {summary.bytes_freed:,} bytes now, and {summary.bytes_marked:,} more after the grace "
              f"period once {summary.bytes_copied:,} bytes of used data are copied to new packs")
    return 0
