"""PNG bar chart of the medians: wall time, CPU and peak tree RSS per measure, one labelled bar per tool.

matplotlib is an optional dependency (the `bench` extra, installed by bench/run); without it no PNG is written.
A failed measure gets no bar but a "failed" label, so a missing bar is never mistaken for zero.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.results import MEASURES

COLORS = {"vaultflow": "#2f6db5", "restic": "#e08a2c", "borg": "#4a9a5b"}
PANELS = (("wall_s", "wall time, s", 1.0), ("cpu_s", "CPU user+sys, s", 1.0),
          ("peak_tree_rss", "peak tree RSS, MiB", 1024 * 1024))


def write_png(path: Path, summary: dict[str, dict[str, dict[str, Any]]], tools: list[str], title: str) -> bool:
    """Write the chart to `path`; returns False (and writes nothing) when matplotlib is unavailable."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
        from matplotlib.ticker import FuncFormatter
    except ImportError:
        return False
    measures = [m for m in MEASURES if any(m in summary.get(t, {}) for t in tools)]
    fig, axes = plt.subplots(len(PANELS), 1, figsize=(max(8, 1.4 * len(measures) + 2), 11), squeeze=False)
    width = 0.8 / max(1, len(tools))
    for ax, (metric, label, scale) in zip(axes[:, 0], PANELS, strict=True):
        for i, tool in enumerate(tools):
            for x, m in enumerate(measures):
                s = summary.get(tool, {}).get(m)
                pos = x - 0.4 + width * (i + 0.5)
                if s is None:
                    continue
                if s[metric] is None:
                    ax.text(pos, 0.03, "failed", rotation=90, ha="center", va="bottom", fontsize=8, color="red",
                            transform=ax.get_xaxis_transform())
                    continue
                bars = ax.bar(pos, s[metric] / scale, width, color=COLORS.get(tool, "grey"))
                ax.bar_label(bars, fmt="%.3g", fontsize=6, padding=1)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _pos: ""))
        ax.margins(y=0.15)
        ax.set_ylabel(label)
        ax.set_xticks(range(len(measures)), [MEASURES[m] for m in measures], rotation=20, ha="right", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.legend(handles=[Patch(color=COLORS.get(t, "grey"), label=t) for t in tools], loc="upper right", ncol=len(tools))
    fig.suptitle(title, x=0.02, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
