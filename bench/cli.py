"""Command line of the benchmark: options, the repetition loop, and writing results (JSON, PNG, console tables).

Exit status: 0 when the benchmark ran (vaultflow failures are reported, not fatal); 2 when restic or borg was
asked for and cannot be found or installed; 3 when a restic or borg measure failed (the reference is broken).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
from rich.console import Console

from bench import baseline, chart, datagen, install, report, scenarios
from bench.mutate import undo_appends
from bench.proc import __doc__ as METHOD
from bench.results import MEASURES, Sample, ratios, sample_dict, summarize
from bench.tools import TASK_RUNNER_ENV, vaultflow_task_runner

HERE = Path(__file__).resolve().parent
TOOLS = ("vaultflow", "restic", "borg")
REFERENCE_TOOLS = ("restic", "borg")
# vaultflow settings worth recording with the results (never the password)
VAULTFLOW_ENV = ("VAULTFLOW_TASK_RUNNER", "VAULTFLOW_AGENT", "VAULTFLOW_WORKERS", "PREFECT_API_URL")


@dataclass(frozen=True)
class Options:
    quick: bool
    reps: int
    data: Path
    work: Path
    out: Path
    tools: list[str]
    only: list[str]
    timeout: float
    series_steps: int
    series_files: int


def _csv(allowed: tuple[str, ...]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"expected a comma list of {', '.join(allowed)}; got {text!r}")
        return items
    return parse


def parse_args(argv: list[str] | None) -> Options:
    p = argparse.ArgumentParser(prog="bench/run", description="vaultflow vs restic vs borg, side by side.")
    p.add_argument("--quick", action="store_true", help="tiny data set, 1 repetition, 3-step series (CI smoke)")
    p.add_argument("--reps", type=int, help="repetitions per measure, medians reported (default 3; quick 1)")
    p.add_argument("--data", type=Path, default=HERE / "data", help="cache of generated data sets")
    p.add_argument("--work", type=Path, default=HERE / "work", help="scratch dir for repositories and restores")
    p.add_argument("--out", type=Path, default=HERE / "results", help="where JSON and PNG results go")
    p.add_argument("--tools", type=_csv(TOOLS), default=list(TOOLS), help="comma list (default: all three)")
    p.add_argument("--only", type=_csv(tuple(MEASURES)), default=list(MEASURES),
                   help=f"comma list of measures: {','.join(MEASURES)}")
    p.add_argument("--timeout", type=float, help="seconds before one command is killed (default 3600; quick 300)")
    p.add_argument("--series-steps", type=int, help="incremental backups in measure 7 (default 10; quick 3)")
    a = p.parse_args(argv)
    return Options(
        quick=a.quick,
        reps=a.reps or (1 if a.quick else 3),
        data=a.data.resolve(), work=a.work.resolve(), out=a.out.resolve(),
        tools=[t for t in TOOLS if t in a.tools], only=[m for m in MEASURES if m in a.only],
        timeout=a.timeout or (300.0 if a.quick else 3600.0),
        series_steps=a.series_steps or (3 if a.quick else 10),
        series_files=100 if a.quick else 1000,
    )


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    console = Console(highlight=False)
    if not console.is_terminal:  # CI logs and pipes: do not wrap the tables at 80 columns
        console = Console(highlight=False, width=132)
    started = time.perf_counter()
    programs = install.locate(opts.tools)
    for prog in programs.values():
        console.print(f"{prog.name:<10} {prog.path or 'NOT FOUND'}  {prog.version or ''}")
    missing = [t for t in REFERENCE_TOOLS if t in opts.tools and not programs[t].path]
    if missing:
        console.print(f"[red]cannot run {', '.join(missing)}: not installed and could not be installed[/red]")
        return 2

    spec = datagen.QUICK if opts.quick else datagen.FULL
    t0 = time.perf_counter()
    ds, generated = datagen.ensure(opts.data, spec)
    gen_s = time.perf_counter() - t0
    if repaired := undo_appends(ds):
        console.print(f"undid an interrupted 1% append on {repaired} cached files")
    ref, scale = datagen.tree_stats(ds.ref), datagen.tree_stats(ds.scale)
    console.print(f"data set {ds.root} ({'generated' if generated else 'cached'} in {gen_s:.1f} s): "
                  f"ref {ref.files} files / {ref.bytes / 1e6:.1f} MB, scale {scale.files} files / "
                  f"{scale.bytes / 1e6:.1f} MB")
    datagen.warm(ds.root)
    runner = vaultflow_task_runner()
    fixed: dict[str, Any] | None = None
    if "vaultflow" in opts.tools and programs["vaultflow"].path:
        console.print(f"vaultflow task runner: {runner or 'auto (the CLI default)'}"
                      f"{f' (from {TASK_RUNNER_ENV})' if runner else ''}")
        fixed = baseline.fixed_rss(programs["vaultflow"].path, dict(os.environ), opts.timeout)
        if fixed["ok"]:
            console.print(f"fixed RSS of Prefect + imports (bare process): "
                          f"{fixed['prefect_and_imports_rss'] / 2**20:.0f} MiB")

    ctx = scenarios.Context(ds=ds, ref=ref, scale=scale, work=opts.work, only=frozenset(opts.only),
                            timeout=opts.timeout, series_steps=opts.series_steps, series_files=opts.series_files,
                            say=lambda s: console.print(s))
    samples: dict[str, dict[str, list[Sample]]] = {t: {} for t in opts.tools}
    order: list[list[str]] = []
    for rep in range(opts.reps):
        tools = opts.tools[rep % len(opts.tools):] + opts.tools[:rep % len(opts.tools)]  # rotate against drift
        order.append(tools)
        for tool in tools:
            console.print(f"[bold]repetition {rep + 1}/{opts.reps}: {tool}[/bold]")
            exe = programs[tool].path
            got = (scenarios.run_tool(ctx, tool, exe, rep) if exe
                   else {m: Sample.failed(f"{tool} executable not found") for m in opts.only})
            for m, s in got.items():
                samples[tool].setdefault(m, []).append(s)
    try:
        opts.work.rmdir()  # only if empty: each repetition already removed what it created
    except OSError:
        pass

    summary = {t: {m: summarize(ss) for m, ss in per.items()} for t, per in samples.items()}
    if fixed is not None:
        fixed["first_backup_peak_tree_rss"] = summary.get("vaultflow", {}).get("first", {}).get("peak_tree_rss")
    total_s = time.perf_counter() - started
    console.print()
    report.render(console, summary, opts.tools, opts.reps, fixed)
    console.print(f"total benchmark time {total_s:.1f} s")

    meta = _meta(opts, programs, ds, ref, scale, gen_s, total_s, order)
    doc: dict[str, object] = {"meta": meta, "vaultflow_fixed_rss": fixed, "summary": summary, "ratios": ratios(summary),
           "samples": {t: {m: [sample_dict(s) for s in ss] for m, ss in per.items()} for t, per in samples.items()}}
    _write(console, opts, doc, summary)

    ref_failed = [f"{t}/{m}" for t in REFERENCE_TOOLS if t in summary
                  for m, s in summary[t].items() if s["failed"]]
    if ref_failed:
        console.print(f"[red]reference tool measures failed: {', '.join(ref_failed)}[/red]")
        return 3
    return 0


def _meta(opts: Options, programs: dict[str, install.Program], ds: datagen.DataSet, ref: datagen.TreeStats,
          scale: datagen.TreeStats, gen_s: float, total_s: float, order: list[list[str]]) -> dict[str, object]:
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "host": platform.node(), "platform": platform.platform(), "python": sys.version.split()[0],
        "cpus": os.cpu_count(), "memory_bytes": psutil.virtual_memory().total,
        "mode": "quick" if opts.quick else "full",
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(opts).items()},
        "programs": {n: asdict(p) for n, p in programs.items()},
        "data_set": {"key": ds.spec.key(), "path": str(ds.root), "spec": asdict(ds.spec),
                     "ref": asdict(ref), "scale": asdict(scale), "prepare_seconds": gen_s},
        "tool_order_per_rep": order,
        "vaultflow_task_runner": vaultflow_task_runner() or "auto",
        "vaultflow_env": {k: os.environ[k] for k in VAULTFLOW_ENV if k in os.environ},
        "measures": MEASURES,
        "method": " ".join((METHOD or "").split()),
        "total_seconds": total_s,
    }


def _write(console: Console, opts: Options, doc: dict[str, object],
           summary: dict[str, dict[str, dict[str, object]]]) -> None:
    opts.out.mkdir(parents=True, exist_ok=True)
    stem = f"{'quick' if opts.quick else 'full'}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    json_path = opts.out / f"{stem}.json"
    json_path.write_text(json.dumps(doc, indent=2, default=str))
    console.print(f"results: {json_path}")
    png = opts.out / f"{stem}.png"
    title = f"vaultflow vs restic vs borg ({'quick' if opts.quick else 'full'}, median of {opts.reps})"
    if chart.write_png(png, summary, opts.tools, title):
        console.print(f"chart:   {png}")
    else:
        console.print("chart:   skipped (matplotlib not installed; bench/run installs it)")
