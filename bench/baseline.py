"""The fixed memory vaultflow pays before any work: a bare interpreter that only imports what the CLI imports
to run a flow (Prefect and the flow modules), measured once per run to report Prefect's share of vaultflow's RSS.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from bench import proc

# What `vaultflow backup` imports on its way to the flow call (cli/run.py: _prefect, _open_first, _run; the
# runtime imports fastapi.encoders when it is installed). Nothing here starts a server or opens a repository.
IMPORTS = ("prefect", "vaultflow.cli", "vaultflow.run", "vaultflow.flows.runtime", "vaultflow.flows.backup",
           "vaultflow.storage.repository", "vaultflow.tasks.context", "vaultflow.tasks.progress", "rich.progress")
OPTIONAL_IMPORTS = ("fastapi.encoders",)


# One process, two readings of its own VmHWM (peak RSS since exec, exact; rusage would carry the spawner's
# high-water mark, see bench.proc): after `import prefect`, then after everything else.
SCRIPT = f"""
import importlib

def hwm():
    try:
        return open('/proc/self/status').read().split('VmHWM:')[1].split()[0]
    except Exception:
        return '?'

import prefect
print('prefect_only_kib=' + hwm())
for m in {IMPORTS!r}:
    importlib.import_module(m)
for m in {OPTIONAL_IMPORTS!r}:
    try:
        importlib.import_module(m)
    except ImportError:
        pass
print('prefect_and_imports_kib=' + hwm())
"""


def interpreter(exe: str) -> str:
    """The Python that runs the `vaultflow` executable `exe` (its console script's shebang), else this one."""
    try:
        with open(exe, "rb") as f:
            first = f.readline(512).decode(errors="replace")
    except OSError:
        return sys.executable
    if first.startswith("#!"):
        candidate = first[2:].strip().split()[0] if first[2:].strip() else ""
        if candidate and Path(candidate).name.startswith("python") and os.access(candidate, os.X_OK):
            return candidate
    return sys.executable


def _reading(stdout: str, name: str) -> int | None:
    for line in stdout.splitlines():
        key, _, value = line.partition("=")
        if key == f"{name}_kib" and value.strip().isdigit():
            return int(value) * 1024
    return None


def fixed_rss(exe: str, env: dict[str, str], timeout: float) -> dict[str, Any]:
    """Peak RSS of a bare process that imports what the CLI imports to run a flow (`prefect_and_imports_rss`),
    and of the same process once it has imported Prefect alone (`prefect_only_rss`); bytes. Without /proc, the
    whole process's measure from bench.proc stands in for the first and the second is None. A failed run is
    {"ok": False, "error": …}, never a number."""
    python = interpreter(exe)
    r = proc.run([python, "-c", SCRIPT], env, timeout=timeout)
    out: dict[str, Any] = {"ok": r.ok, "python": python, "imports": [*IMPORTS, *OPTIONAL_IMPORTS]}
    if not r.ok:
        return out | {"error": r.error()}
    return out | {"prefect_and_imports_rss": _reading(r.stdout, "prefect_and_imports") or r.max_process_rss,
                  "prefect_only_rss": _reading(r.stdout, "prefect_only"),
                  "peak_tree_rss": r.peak_tree_rss, "wall_s": r.wall_s, "cpu_s": r.cpu_s}
