"""`vaultflow metrics`: the repository's health as OpenMetrics text (node_exporter's textfile collector, a
Pushgateway), read straight from storage/ like `snapshots`: no Prefect, so a cron job or a sidecar runs it cheaply.

Every family is a gauge named `vaultflow_…`, labelled `repository` (the URL) and, per source, `source`. The text
is valid OpenMetrics and valid Prometheus text format (`# EOF` is a comment there).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vaultflow.storage.repository import Repository
from vaultflow.storage.snapshot import SnapshotRecord, parse_utc
from vaultflow.tasks import settings

DEFAULT_VERIFIED_DAYS = 30.0

# name → help, in the order families are printed. Per-source families first, then repository-wide ones.
SOURCE_FAMILIES = {
    "vaultflow_last_success_timestamp_seconds": "When the newest snapshot of the source finished (unix seconds); "
                                                "alert on time() minus this",
    "vaultflow_last_success_age_seconds": "Seconds since the newest snapshot of the source finished, as of this "
                                          "export",
    "vaultflow_source_snapshots": "Snapshots of the source in the repository (tombstones and forgotten excluded)",
    "vaultflow_last_snapshot_serial": "Serial of the newest snapshot of the source in its hash chain",
    "vaultflow_last_snapshot_bytes": "Logical size of the files in the newest snapshot of the source",
    "vaultflow_last_snapshot_files": "Files in the newest snapshot of the source",
    "vaultflow_last_snapshot_errors": "Entries the newest backup of the source could not read",
    "vaultflow_last_snapshot_duration_seconds": "How long the newest backup of the source took (finished minus "
                                                "started)",
    "vaultflow_last_snapshot_added_bytes": "New data (before compression) the newest backup of the source added",
}
REPOSITORY_FAMILIES = {
    "vaultflow_repository_packs": "Pack files in the repository's data/",
    "vaultflow_repository_stored_bytes": "Bytes of the repository's pack files as stored",
    "vaultflow_repository_snapshots": "Snapshots in the repository (tombstones and forgotten excluded)",
    "vaultflow_repository_sources": "Sources with at least one snapshot",
    "vaultflow_repository_damaged_records": "Snapshot records that fail to parse or authenticate (run vaultflow "
                                            "check)",
    "vaultflow_verification_window_days": "The window, in days, of the verification coverage below",
    "vaultflow_verification_coverage_ratio": "Share of packs read and authenticated by check within the window "
                                             "(state on the machine that ran check)",
    "vaultflow_verification_verified_packs": "Packs read and authenticated by check within the window",
    "vaultflow_verification_never_verified_packs": "Packs never read and authenticated by check on this machine",
    "vaultflow_verification_oldest_timestamp_seconds": "Least recent verification among the packs verified at all "
                                                       "(unix seconds; absent when none was)",
}


@dataclass
class Samples:
    """Values by family, each a list of (labels, value); families without samples are still described."""

    values: dict[str, list[tuple[dict[str, str], float]]] = field(default_factory=dict)

    def add(self, name: str, labels: dict[str, str], value: float) -> None:
        self.values.setdefault(name, []).append((labels, value))


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("metrics", parents=[common], help="print OpenMetrics text (last success per source, sizes, "
                       "damaged records, verification coverage) for node_exporter or a Pushgateway; no Prefect")
    p.add_argument("--verified-within", type=float, default=DEFAULT_VERIFIED_DAYS, metavar="DAYS",
                   help="verification coverage counts packs read by check in the last DAYS days (default 30)")
    p.add_argument("--output", "-o", metavar="FILE", help="write FILE atomically (a .prom file in node_exporter's "
                   "--collector.textfile.directory) instead of printing")
    p.set_defaults(func=cmd_metrics)


def cmd_metrics(args: argparse.Namespace) -> int:
    from vaultflow.storage.errors import VaultflowError

    if not args.verified_within > 0:
        raise VaultflowError(f"--verified-within {args.verified_within}: give a positive number of days")
    s = settings.resolve(args.repo, args.password_file, args.password_secret)
    repo = Repository.open(s.url, s.password(), storage_options=s.storage_options)
    text = exposition(repo, time.time(), args.verified_within)
    if args.output:
        write_atomically(Path(args.output), text)
    else:
        sys.stdout.write(text)
    return 0


def exposition(repo: Repository, now: float, verified_days: float = DEFAULT_VERIFIED_DAYS) -> str:
    """The OpenMetrics text for `repo` as of `now` (unix seconds)."""
    return render(collect(repo, now, verified_days))


def collect(repo: Repository, now: float, verified_days: float) -> Samples:
    from vaultflow.tasks import verified

    records = repo.snapshots()
    base = {"repository": repo.url}
    out = Samples()
    by_source: dict[str, list[SnapshotRecord]] = {}
    for rec in records.values():
        by_source.setdefault(rec.source, []).append(rec)
    for source, recs in sorted(by_source.items()):
        _source(out, {**base, "source": source}, recs, now)
    packs = list(repo.backend.list("data"))
    out.add("vaultflow_repository_packs", base, len(packs))
    out.add("vaultflow_repository_stored_bytes", base, sum(size for _, size in packs))
    out.add("vaultflow_repository_snapshots", base, len(records))
    out.add("vaultflow_repository_sources", base, len(by_source))
    out.add("vaultflow_repository_damaged_records", base, len(repo.damaged_records))
    cover = verified.coverage(verified.load_verified(repo.config.id), (name for name, _ in packs), now,
                              verified_days)
    out.add("vaultflow_verification_window_days", base, verified_days)
    out.add("vaultflow_verification_coverage_ratio", base, cover.ratio)
    out.add("vaultflow_verification_verified_packs", base, cover.verified)
    out.add("vaultflow_verification_never_verified_packs", base, cover.never)
    if cover.oldest is not None:
        out.add("vaultflow_verification_oldest_timestamp_seconds", base, cover.oldest)
    return out


def _source(out: Samples, labels: dict[str, str], recs: list[SnapshotRecord], now: float) -> None:
    """The newest snapshot by serial (the chain orders history; clocks do not) and the source's count."""
    last = max(recs, key=lambda r: r.serial)
    finished = parse_utc(last.finished).timestamp()
    out.add("vaultflow_last_success_timestamp_seconds", labels, finished)
    out.add("vaultflow_last_success_age_seconds", labels, max(0.0, now - finished))
    out.add("vaultflow_source_snapshots", labels, len(recs))
    out.add("vaultflow_last_snapshot_serial", labels, last.serial)
    out.add("vaultflow_last_snapshot_bytes", labels, float(last.stats.get("bytes", 0)))
    out.add("vaultflow_last_snapshot_files", labels, float(last.stats.get("files", 0)))
    out.add("vaultflow_last_snapshot_errors", labels, float(last.stats.get("errors", 0)))
    out.add("vaultflow_last_snapshot_duration_seconds", labels,
            max(0.0, finished - parse_utc(last.started).timestamp()))
    out.add("vaultflow_last_snapshot_added_bytes", labels, float(last.stats.get("bytes_added", 0)))


def render(samples: Samples) -> str:
    lines: list[str] = []
    for name, help_text in (*SOURCE_FAMILIES.items(), *REPOSITORY_FAMILIES.items()):
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge"]
        lines += [f"{name}{{{_labels(labels.items())}}} {_number(value)}"
                  for labels, value in samples.values.get(name, [])]
    return "\n".join([*lines, "# EOF"]) + "\n"


def _labels(pairs: Iterable[tuple[str, str]]) -> str:
    return ",".join(f'{k}="{_escape(v)}"' for k, v in pairs)


def _escape(value: str) -> str:
    """Label values as both formats require: backslash, double quote and newline escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if float(value).is_integer() and abs(value) < 2**63:
        return str(int(value))
    return repr(float(value))


def write_atomically(path: Path, text: str) -> None:
    """node_exporter may read the file at any moment: write beside it, then rename over it."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or Path("."))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # node_exporter usually runs as another user
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
