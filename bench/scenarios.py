"""The measured procedures: for one tool and one repetition, run measures 1-9 on fresh local repositories.

Measures 1-5 and 8 share one repository (first backup, no-change, 1 % append, check, restore, snapshots);
measures 6b, 6 and 6c (scale set: first backup, no-change, restore) share another; 7 (evolving tree) and 9 (prune
after forgetting all but its newest snapshot) share a third. A step the others depend on that fails marks those
others failed too, with the reason; nothing is retried or estimated.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench import proc
from bench.datagen import DataSet, TreeStats, tree_stats
from bench.mutate import EvolvingTree, appended
from bench.results import Sample
from bench.tools import ADAPTERS, Adapter, Cmd

MAIN_CHAIN = ("first", "nochange", "append", "check", "restore", "snapshots")
SCALE_CHAIN = ("scale_first", "scale", "scale_restore")


@dataclass(frozen=True)
class Context:
    """What every tool/repetition shares: data set, scratch dir, selection and limits."""

    ds: DataSet
    ref: TreeStats
    scale: TreeStats
    work: Path
    only: frozenset[str]
    timeout: float
    series_steps: int
    series_files: int
    say: Callable[[str], None]


class _Runner:
    """Runs an adapter's commands with the shared timeout, logging each one."""

    def __init__(self, ctx: Context, adapter: Adapter, label: str) -> None:
        self.ctx, self.a, self.label = ctx, adapter, label

    def __call__(self, what: str, cmd: Cmd) -> proc.Run:
        r = proc.run(cmd.argv, self.a.env(), cwd=cmd.cwd, timeout=self.ctx.timeout, ok_codes=cmd.ok_codes)
        status = f"{r.wall_s:7.2f} s" if r.ok else "FAILED"
        self.ctx.say(f"  {self.label:<22} {what:<12} {status}")
        return r


def _adapter(name: str, exe: str, base: Path, repo: str) -> Adapter:
    home = base / f"home-{repo}"
    home.mkdir(parents=True, exist_ok=True)
    return ADAPTERS[name](exe, base / repo, home)


def _init(run: _Runner) -> str | None:
    r = run("init", run.a.init())
    if not r.ok:
        return "init failed: " + r.error()
    if not run.a.repo.exists() or not any(run.a.repo.iterdir()):
        return f"init exited 0 but wrote no repository at {run.a.repo}"
    return None


def _backup(run: _Runner, what: str, path: Path) -> tuple[Sample, proc.Run]:
    before = tree_stats(run.a.repo).bytes
    r = run(what, run.a.backup(path))
    sample = Sample.from_runs([r])
    after = tree_stats(run.a.repo).bytes
    if sample.ok and after <= before:
        sample = Sample.failed(f"backup exited 0 but the repository did not grow ({before} bytes)")
    if sample.ok:
        sample.extra["repo_bytes"] = after
    return sample, r


def main_chain(ctx: Context, name: str, exe: str, base: Path) -> dict[str, Sample]:
    """Measures 1-5 and 8 on one repository, in that order."""
    wanted = [m for m in MAIN_CHAIN if m in ctx.only]
    run = _Runner(ctx, _adapter(name, exe, base, "repo"), f"{name}")
    err = _init(run)
    if err:
        return {m: Sample.failed(err) for m in wanted}
    out: dict[str, Sample] = {}
    first, _ = _backup(run, "first", ctx.ds.ref)
    if first.ok and first.wall_s:
        first.extra["mb_per_s"] = ctx.ref.bytes / 1e6 / first.wall_s
    if "first" in ctx.only:
        out["first"] = first
    if not first.ok:
        return out | {m: Sample.failed("skipped: first backup failed") for m in wanted if m != "first"}
    latest_bytes = ctx.ref.bytes
    if "nochange" in ctx.only:
        out["nochange"], _ = _backup(run, "nochange", ctx.ds.ref)
    if "append" in ctx.only:
        with appended(ctx.ds) as added:
            out["append"], _ = _backup(run, "append", ctx.ds.ref)
        out["append"].extra["appended_bytes"] = added
        if out["append"].ok:
            latest_bytes += added
    if "check" in ctx.only:
        out["check"] = Sample.from_runs([run("check", run.a.check())])
    if "restore" in ctx.only:
        out["restore"] = _restore(run, base / "restore", TreeStats(ctx.ref.files, latest_bytes))
    if "snapshots" in ctx.only:
        out["snapshots"] = Sample.from_runs([run("snapshots", run.a.snapshots())])
    return out


def _restore(run: _Runner, target: Path, expected: TreeStats) -> Sample:
    """A full restore of the latest snapshot into the new folder `target`, which must then hold exactly
    `expected` (file count and bytes); the folder is removed afterwards."""
    target.mkdir(parents=True)
    sample = Sample.from_runs([run("restore", run.a.restore(target))])
    got = tree_stats(target)
    shutil.rmtree(target)
    if sample.ok and got != expected:
        return Sample.failed(f"restore exited 0 but wrote {got.files} files / {got.bytes} bytes, "
                             f"expected {expected.files} / {expected.bytes}")
    if sample.ok:
        sample.extra["restored_bytes"] = got.bytes
    return sample


def _per_file(sample: Sample, files: int) -> Sample:
    if sample.ok and sample.wall_s:
        sample.extra["files_per_s"] = files / sample.wall_s
    return sample


def scale_set(ctx: Context, name: str, exe: str, base: Path) -> dict[str, Sample]:
    """Measures 6b, 6 and 6c on one repository of the many-small-files set: its first backup (always run, as
    the others need it; measured when selected), a no-change backup, and a full restore of the latest snapshot."""
    wanted = [m for m in SCALE_CHAIN if m in ctx.only]
    run = _Runner(ctx, _adapter(name, exe, base, "scale-repo"), f"{name} scale")
    err = _init(run)
    if err:
        return {m: Sample.failed(err) for m in wanted}
    out: dict[str, Sample] = {}
    first = _per_file(_backup(run, "first", ctx.ds.scale)[0], ctx.scale.files)
    if "scale_first" in ctx.only:
        out["scale_first"] = first
    if not first.ok:
        why = "skipped: first backup of the scale set failed: " + (first.error or "")
        return out | {m: Sample.failed(why) for m in wanted if m != "scale_first"}
    if "scale" in ctx.only:
        out["scale"] = _per_file(_backup(run, "nochange", ctx.ds.scale)[0], ctx.scale.files)
    if "scale_restore" in ctx.only:
        out["scale_restore"] = _per_file(_restore(run, base / "scale-restore", ctx.scale), ctx.scale.files)
    return out


def series(ctx: Context, name: str, exe: str, base: Path) -> dict[str, Sample]:
    """Measure 7: `series_steps` small incremental backups of an evolving tree, summed; then measure 9 on the same
    repository: forget all but the newest snapshot (not measured) and prune (measured)."""
    wanted = [m for m in ("series", "prune") if m in ctx.only]
    run = _Runner(ctx, _adapter(name, exe, base, "series-repo"), f"{name} series")
    err = _init(run)
    if err:
        return {m: Sample.failed(err) for m in wanted}
    tree = EvolvingTree(base / "evolving", ctx.ds.spec.seed + 7, ctx.series_files)
    tree.create()
    first, _ = _backup(run, "initial", tree.root)
    if not first.ok:
        return {m: Sample.failed("skipped: initial backup of the evolving tree failed: " + (first.error or ""))
                for m in wanted}
    runs = []
    for n in range(ctx.series_steps):
        tree.step(n)
        r = run(f"step {n + 1}", run.a.backup(tree.root))
        runs.append(r)
        if not r.ok:
            break
    sample = Sample.from_runs(runs)
    if sample.ok:
        sample.extra["repo_bytes"] = tree_stats(run.a.repo).bytes
    out = {"series": sample} if "series" in ctx.only else {}
    if "prune" in ctx.only:
        out["prune"] = _prune(run) if sample.ok else Sample.failed("skipped: the incremental series failed: "
                                                                   + (sample.error or ""))
    return out


def _prune(run: _Runner) -> Sample:
    """Measure 9: forget all but the newest snapshot (not measured), then the tool's prune; records the repository
    size after it and the bytes it freed."""
    forgot = run("forget", run.a.forget(1))
    if not forgot.ok:
        return Sample.failed("forget failed: " + forgot.error())
    before = tree_stats(run.a.repo).bytes
    runs = []
    for i, cmd in enumerate(run.a.prune()):
        runs.append(run(f"prune {i + 1}", cmd))
        if not runs[-1].ok:
            break
    sample = Sample.from_runs(runs)
    if sample.ok:
        after = tree_stats(run.a.repo).bytes
        sample.extra["repo_bytes"] = after
        sample.extra["freed_bytes"] = before - after
    return sample


def run_tool(ctx: Context, name: str, exe: str, rep: int) -> dict[str, Sample]:
    """All selected measures for one tool in one repetition, on repositories created and removed here."""
    base = ctx.work / f"{name}-rep{rep}"
    if base.exists():
        shutil.rmtree(base)
    base.mkdir(parents=True)
    out: dict[str, Sample] = {}
    try:
        if ctx.only & set(MAIN_CHAIN):
            out |= main_chain(ctx, name, exe, base)
        if ctx.only & set(SCALE_CHAIN):
            out |= scale_set(ctx, name, exe, base)
        if ctx.only & {"series", "prune"}:
            out |= series(ctx, name, exe, base)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return out
