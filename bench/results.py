"""Measurement records: one Sample per (tool, measure, repetition), their medians, and vaultflow/other ratios.

A failed measure is a Sample with ok=False and the error text; it never carries a number.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

from bench.proc import Run
from bench.tools import parse_agent_usage, parse_vaultflow_timings

MEASURES: dict[str, str] = {
    "first": "1 first backup",
    "nochange": "2 no-change backup",
    "append": "3 backup, 1% appended",
    "check": "4 check, read all data",
    "restore": "5 full restore",
    "scale_first": "6b first backup, scale set",
    "scale": "6 no-change, scale set",
    "scale_restore": "6c full restore, scale set",
    "series": "7 incremental series",
    "snapshots": "8 list snapshots",
    "prune": "9 prune after forget (series repo)",
}
METRICS = ("wall_s", "cpu_s", "peak_tree_rss", "max_process_rss")


@dataclass
class Sample:
    """One measured repetition of one measure; a series of commands is summed (peaks: the maximum)."""

    ok: bool
    wall_s: float | None = None
    cpu_s: float | None = None
    peak_tree_rss: int | None = None
    max_process_rss: int | None = None
    commands: int = 0
    error: str | None = None
    extra: dict[str, float] = field(default_factory=dict)

    @classmethod
    def failed(cls, error: str) -> Sample:
        return cls(ok=False, error=error)

    @classmethod
    def from_runs(cls, runs: list[Run]) -> Sample:
        """Sums (wall, CPU) and maxima (RSS) over `runs`. A vaultflow command handed to its agent ran in a
        process outside the measured tree; the agent's own rusage of it (printed under VAULTFLOW_TIMINGS) is
        added: its CPU to the CPU, its peak RSS to the tree's peak and to the largest single process."""
        bad = next((r for r in runs if not r.ok), None)
        if bad is not None:
            return cls.failed(bad.error())
        usage = [parse_agent_usage(r.stderr + "\n" + r.stdout) for r in runs]
        agent_cpu = [u[0] if u else 0.0 for u in usage]
        agent_rss = [u[1] if u else 0 for u in usage]
        sample = cls(
            ok=True,
            wall_s=sum(r.wall_s for r in runs),
            cpu_s=sum(r.cpu_s for r in runs) + sum(agent_cpu),
            peak_tree_rss=max(r.peak_tree_rss + a for r, a in zip(runs, agent_rss, strict=True)),
            max_process_rss=max(max(r.max_process_rss, a) for r, a in zip(runs, agent_rss, strict=True)),
            commands=len(runs),
        )
        if any(usage):
            sample.extra["agent_cpu_s"] = sum(agent_cpu)
            sample.extra["agent_max_rss"] = max(agent_rss)
        timings = [parse_vaultflow_timings(r.stderr + "\n" + r.stdout) for r in runs]
        if timings and all(t is not None for t in timings):
            sample.extra["prefect_startup_s"] = sum(t[0] for t in timings if t)
            sample.extra["pipeline_s"] = sum(t[1] for t in timings if t)
        return sample


def summarize(samples: list[Sample]) -> dict[str, Any]:
    """Medians over the successful repetitions; `failed` counts the others, `errors` keeps their text."""
    good = [s for s in samples if s.ok]
    out: dict[str, Any] = {"reps": len(samples), "failed": len(samples) - len(good),
                           "errors": [s.error for s in samples if not s.ok]}
    for metric in METRICS:
        values = [getattr(s, metric) for s in good if getattr(s, metric) is not None]
        out[metric] = statistics.median(values) if values else None
    keys = sorted({k for s in good for k in s.extra})
    out["extra"] = {k: statistics.median([s.extra[k] for s in good if k in s.extra]) for k in keys}
    return out


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def ratios(summary: dict[str, dict[str, dict[str, Any]]]) -> dict[str, dict[str, dict[str, float | None]]]:
    """{measure: {"vaultflow/restic": {metric: ratio}}} for the tools present in this run."""
    vf = summary.get("vaultflow")
    out: dict[str, dict[str, dict[str, float | None]]] = {}
    if vf is None:
        return out
    for other in ("restic", "borg"):
        ref = summary.get(other)
        if ref is None:
            continue
        for measure, s in vf.items():
            if measure not in ref:
                continue
            row = {m: ratio(s[m], ref[measure][m]) for m in METRICS}
            for k, v in s["extra"].items():
                if k in ref[measure]["extra"]:
                    row[k] = ratio(v, ref[measure]["extra"][k])
            out.setdefault(measure, {})[f"vaultflow/{other}"] = row
    return out


def sample_dict(s: Sample) -> dict[str, Any]:
    return asdict(s)
