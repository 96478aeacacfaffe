"""How each program under test is driven: one adapter per tool, bound to one local repository.

An adapter only builds command lines and environments (run and measured by bench.proc); it holds the per-repo
state a tool needs (borg's archive names). Also parses vaultflow's optional timing and agent-usage lines.
"""

from __future__ import annotations

import os
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

PASSWORD = "vaultflow-bench-password"
TASK_RUNNER_ENV = "VAULTFLOW_BENCH_TASK_RUNNER"  # when set: `--task-runner VALUE` on vaultflow's flow commands


def vaultflow_task_runner() -> str | None:
    """The `--task-runner` the benchmark passes to vaultflow (None: the CLI's default, auto)."""
    return os.environ.get(TASK_RUNNER_ENV, "").strip() or None


@dataclass(frozen=True)
class Cmd:
    """A command line, its working directory, and the exit codes that mean success."""

    argv: list[str]
    cwd: Path | None = None
    ok_codes: frozenset[int] = frozenset({0})


class Adapter(ABC):
    """One tool on one repository at `repo`; `home` holds restic's and borg's caches for this run only.

    vaultflow keeps the caller's environment (PREFECT_HOME, PREFECT_API_URL), as an operator's command would.
    """

    name: str

    def __init__(self, exe: str, repo: Path, home: Path) -> None:
        self.exe = exe
        self.repo = repo
        self.home = home

    def env(self) -> dict[str, str]:
        return {**os.environ, **self._env()}

    @abstractmethod
    def _env(self) -> dict[str, str]: ...

    @abstractmethod
    def init(self) -> Cmd: ...

    @abstractmethod
    def backup(self, path: Path) -> Cmd: ...

    @abstractmethod
    def check(self) -> Cmd: ...

    @abstractmethod
    def restore(self, target: Path) -> Cmd: ...

    @abstractmethod
    def snapshots(self) -> Cmd: ...

    @abstractmethod
    def forget(self, keep_last: int) -> Cmd:
        """Remove all but the newest `keep_last` snapshots (their data stays until prune)."""

    @abstractmethod
    def prune(self) -> list[Cmd]:
        """Free the data no snapshot references: the commands whose sum is measured."""


class Restic(Adapter):
    name = "restic"

    def _env(self) -> dict[str, str]:
        return {"RESTIC_REPOSITORY": str(self.repo), "RESTIC_PASSWORD": PASSWORD,
                "RESTIC_CACHE_DIR": str(self.home / "restic-cache")}

    def init(self) -> Cmd:
        return Cmd([self.exe, "init", "--repository-version", "2"])

    def backup(self, path: Path) -> Cmd:
        return Cmd([self.exe, "backup", "--compression", "auto", "--host", "bench", str(path)])

    def check(self) -> Cmd:
        return Cmd([self.exe, "check", "--read-data"])

    def restore(self, target: Path) -> Cmd:
        return Cmd([self.exe, "restore", "latest", "--target", str(target)])

    def snapshots(self) -> Cmd:
        return Cmd([self.exe, "snapshots"])

    def forget(self, keep_last: int) -> Cmd:
        return Cmd([self.exe, "forget", "--keep-last", str(keep_last)])

    def prune(self) -> list[Cmd]:
        return [Cmd([self.exe, "prune"])]  # --max-unused 5% by default, as vaultflow's


class Borg(Adapter):
    name = "borg"
    OK = frozenset({0, 1})  # borg exits 1 for warnings (e.g. a file changed while read); the archive exists

    def __init__(self, exe: str, repo: Path, home: Path) -> None:
        super().__init__(exe, repo, home)
        self._archives = 0

    def _env(self) -> dict[str, str]:
        return {"BORG_REPO": str(self.repo), "BORG_PASSPHRASE": PASSWORD, "BORG_BASE_DIR": str(self.home),
                "BORG_RELOCATED_REPO_ACCESS_IS_OK": "yes"}

    def init(self) -> Cmd:
        return Cmd([self.exe, "init", "--encryption", "repokey-blake2"])

    def backup(self, path: Path) -> Cmd:
        self._archives += 1
        return Cmd([self.exe, "create", "--compression", "zstd,3", f"::snap-{self._archives:03d}", str(path)],
                   ok_codes=self.OK)

    def check(self) -> Cmd:
        return Cmd([self.exe, "check", "--verify-data"], ok_codes=self.OK)

    def restore(self, target: Path) -> Cmd:
        return Cmd([self.exe, "extract", f"::snap-{self._archives:03d}"], cwd=target, ok_codes=self.OK)

    def snapshots(self) -> Cmd:
        return Cmd([self.exe, "list"])

    def forget(self, keep_last: int) -> Cmd:
        return Cmd([self.exe, "prune", "--keep-last", str(keep_last)], ok_codes=self.OK)

    def prune(self) -> list[Cmd]:
        return [Cmd([self.exe, "compact"], ok_codes=self.OK)]  # borg 1.2: `prune` only forgets, compact frees


class Vaultflow(Adapter):
    name = "vaultflow"
    SOURCE = "bench"

    def __init__(self, exe: str, repo: Path, home: Path) -> None:
        super().__init__(exe, repo, home)
        runner = vaultflow_task_runner()
        self._runner = ["--task-runner", runner] if runner else []

    def _env(self) -> dict[str, str]:
        return {"VAULTFLOW_REPOSITORY": str(self.repo), "VAULTFLOW_PASSWORD": PASSWORD, "VAULTFLOW_TIMINGS": "1"}

    def init(self) -> Cmd:
        return Cmd([self.exe, "init"])

    def backup(self, path: Path) -> Cmd:
        return Cmd([self.exe, "backup", str(path), "--source", self.SOURCE, *self._runner])

    def check(self) -> Cmd:
        return Cmd([self.exe, "check", "--read-data", *self._runner])

    def restore(self, target: Path) -> Cmd:
        return Cmd([self.exe, "restore", "latest", str(target), *self._runner])

    def snapshots(self) -> Cmd:
        return Cmd([self.exe, "snapshots"])

    def forget(self, keep_last: int) -> Cmd:
        return Cmd([self.exe, "forget", "--keep-last", str(keep_last)])

    def prune(self) -> list[Cmd]:
        # Two phases: the first makes unused packs deletion candidates, the second (grace 0 here, 24 h by default)
        # deletes them; both are measured, so the space is freed as restic's and borg's single command frees it.
        return [Cmd([self.exe, "prune", "--grace", "0s"]), Cmd([self.exe, "prune", "--grace", "0s"])]


ADAPTERS: dict[str, type[Adapter]] = {"vaultflow": Vaultflow, "restic": Restic, "borg": Borg}

_NUM = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_TIMING = re.compile(rf"prefect_startup_seconds\s*[=:]\s*[\"']?({_NUM})"
                     rf"[\s\S]*?pipeline_seconds\s*[=:]\s*[\"']?({_NUM})")
_AGENT_CPU = re.compile(rf"\bagent_cpu_seconds=({_NUM})")
_AGENT_RSS = re.compile(rf"\bagent_max_rss_kb=({_NUM})")


def parse_vaultflow_timings(text: str) -> tuple[float, float] | None:
    """(prefect_startup_seconds, pipeline_seconds) from the last timing line in `text`, if there is one."""
    found = None
    for line in text.splitlines():
        m = _TIMING.search(line)
        if m:
            found = (float(m.group(1)), float(m.group(2)))
    return found


def parse_agent_usage(text: str) -> tuple[float, int] | None:
    """(cpu seconds, peak RSS bytes) of the vaultflow agent's process that ran the command, from the
    `agent_cpu_seconds=X agent_max_rss_kb=Y` line the CLI prints under VAULTFLOW_TIMINGS; None when the command
    ran in the CLI's own process tree."""
    found = None
    for line in text.splitlines():
        cpu, rss = _AGENT_CPU.search(line), _AGENT_RSS.search(line)
        if cpu and rss:
            found = (float(cpu.group(1)), int(float(rss.group(1)) * 1024))
    return found
