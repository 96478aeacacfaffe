"""Console report: rich tables of medians per tool with vaultflow/restic and vaultflow/borg ratios, and failures."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from bench.results import MEASURES, ratio

Summary = dict[str, dict[str, dict[str, Any]]]  # tool -> measure -> summarize() output
Getter = Callable[[dict[str, Any]], float | None]
MiB = 1024 * 1024
SNAPSHOTS_TARGET_S = 0.5


def _metric(name: str, scale: float = 1.0) -> Getter:
    def get(s: dict[str, Any]) -> float | None:
        v = s.get(name, s["extra"].get(name))
        return None if v is None else v / scale
    return get


def _cell(summary: Summary, tool: str, measure: str, get: Getter, fmt: str) -> tuple[str, float | None]:
    s = summary.get(tool, {}).get(measure)
    if s is None:
        return "–", None
    value = get(s)
    if value is None:
        return ("[red]failed[/red]" if s["failed"] else "–"), None
    text = format(value, fmt)
    if s["failed"]:
        text += f" [red]({s['failed']}/{s['reps']} failed)[/red]"
    return text, value


def _table(title: str, rows: list[tuple[str, str, Getter]], tools: list[str], summary: Summary,
           fmt: str) -> Table:
    others = [t for t in ("restic", "borg") if t in tools] if "vaultflow" in tools else []
    table = Table(title=title, title_justify="left")
    table.add_column("measure")
    for t in tools:
        table.add_column(t, justify="right")
    for o in others:
        table.add_column(f"vf/{o}", justify="right")
    for label, measure, get in rows:
        cells = {t: _cell(summary, t, measure, get, fmt) for t in tools}
        if all(v is None and text == "–" for text, v in cells.values()):
            continue
        ratio_cells = []
        for o in others:
            r = ratio(cells["vaultflow"][1], cells[o][1])
            ratio_cells.append("–" if r is None else f"{r:.2f}×")
        table.add_row(label, *[cells[t][0] for t in tools], *ratio_cells)
    return table


def render(console: Console, summary: Summary, tools: list[str], reps: int,
           fixed: dict[str, Any] | None = None) -> None:
    """Print every table; the caller prints the header with versions and the data set. `fixed`: the bare
    import processes' RSS (bench.baseline.fixed_rss), shown against vaultflow's first backup."""
    measures = [m for m in MEASURES if any(m in summary.get(t, {}) for t in tools)]

    def per_measure(name: str, scale: float = 1.0) -> list[tuple[str, str, Getter]]:
        return [(MEASURES[m], m, _metric(name, scale)) for m in measures]

    console.print(_table(f"Wall time, s (median of {reps}; vf/x = vaultflow ÷ x, < 1: vaultflow faster)",
                         per_measure("wall_s"), tools, summary, ".2f"))
    console.print(_table("CPU user+sys, s (process tree)", per_measure("cpu_s"), tools, summary, ".2f"))
    console.print(_table("Peak RSS of the process tree, MiB (50 ms samples)", per_measure("peak_tree_rss", MiB),
                         tools, summary, ".0f"))
    derived = [
        ("1 first backup, MB/s (higher: faster)", "first", _metric("mb_per_s")),
        ("6b scale first backup, files/s (higher: faster)", "scale_first", _metric("files_per_s")),
        ("6 scale no-change, files/s (higher: faster)", "scale", _metric("files_per_s")),
        ("6c scale restore, files/s (higher: faster)", "scale_restore", _metric("files_per_s")),
        ("repo after first backup, MiB", "first", _metric("repo_bytes", MiB)),
        ("repo after 1% append, MiB", "append", _metric("repo_bytes", MiB)),
        ("scale-set repo after 6b, MiB", "scale_first", _metric("repo_bytes", MiB)),
        ("scale-set repo after 6, MiB", "scale", _metric("repo_bytes", MiB)),
        ("incremental-series repo, MiB", "series", _metric("repo_bytes", MiB)),
        ("series repo after forget + prune, MiB", "prune", _metric("repo_bytes", MiB)),
        ("9 prune freed, MiB", "prune", _metric("freed_bytes", MiB)),
    ]
    console.print(_table("Throughput and repository size (du --apparent-size)", derived, tools, summary, ".1f"))
    _fixed_rss(console, fixed, summary.get("vaultflow", {}).get("first"))
    _prefect_split(console, summary.get("vaultflow", {}))
    _snapshots_target(console, summary.get("vaultflow", {}).get("snapshots"))
    _failures(console, summary)


def _fixed_rss(console: Console, fixed: dict[str, Any] | None, first: dict[str, Any] | None) -> None:
    if fixed is None:
        return
    if not fixed["ok"]:
        console.print("fixed RSS of Prefect + imports: [red]failed[/red] (the error is in the JSON)")
        return
    rss, alone = fixed["prefect_and_imports_rss"], fixed["prefect_only_rss"]
    peak = first["peak_tree_rss"] if first else None
    of = (f"of vaultflow's peak tree RSS {peak / MiB:.0f} MiB in the first backup, {rss / peak:.0%}" if peak
          else "vaultflow's first backup not measured")
    prefect = f"; import prefect alone {alone / MiB:.0f} MiB" if alone else ""
    console.print(f"fixed RSS of Prefect + imports: {rss / MiB:.0f} MiB ({of}{prefect})")


def _prefect_split(console: Console, vf: dict[str, dict[str, Any]]) -> None:
    rows = [(m, vf[m]) for m in MEASURES if m in vf and "prefect_startup_s" in vf[m]["extra"]]
    if not rows:
        return
    table = Table(title="vaultflow: Prefect start-up vs pipeline, s (from VAULTFLOW_TIMINGS)", title_justify="left")
    for col in ("measure", "whole process", "prefect start-up", "pipeline", "other (imports, exit)"):
        table.add_column(col, justify="left" if col == "measure" else "right")
    for m, s in rows:
        startup, pipeline = s["extra"]["prefect_startup_s"], s["extra"]["pipeline_s"]
        rest = s["wall_s"] - startup - pipeline if s["wall_s"] is not None else None
        table.add_row(MEASURES[m], f"{s['wall_s']:.2f}", f"{startup:.2f}", f"{pipeline:.2f}",
                      "–" if rest is None else f"{rest:.2f}")
    console.print(table)


def _snapshots_target(console: Console, s: dict[str, Any] | None) -> None:
    if s is None:
        return
    if s["wall_s"] is None:
        console.print(f"vaultflow snapshots: [red]failed[/red] (target ≤ {SNAPSHOTS_TARGET_S} s)")
        return
    met = s["wall_s"] <= SNAPSHOTS_TARGET_S
    verdict = "[green]met[/green]" if met else "[red]missed[/red]"
    console.print(f"vaultflow snapshots: {s['wall_s']:.2f} s whole process "
                  f"(target ≤ {SNAPSHOTS_TARGET_S} s: {verdict})")


def _failures(console: Console, summary: Summary) -> None:
    for tool, measures in summary.items():
        for m, s in measures.items():
            for err in dict.fromkeys(s["errors"]):  # identical reasons across repetitions once
                short = err if len(err) <= 400 else "…" + err[-400:]
                console.print(f"[red]FAILED[/red] {tool} / {MEASURES[m]}: {escape(short)}", highlight=False)
