"""Finds the three programs under test, installs restic and borg from Debian when missing, records versions."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

DEBIAN_PACKAGES = {"restic": "restic", "borg": "borgbackup"}


@dataclass(frozen=True)
class Program:
    """A located executable and its reported version (None when it could not be found)."""

    name: str
    path: str | None
    version: str | None


def _which_vaultflow() -> str | None:
    override = os.environ.get("VAULTFLOW_BENCH_EXE")  # benchmark a specific build
    if override:
        return shutil.which(override)
    beside = Path(sys.executable).parent / "vaultflow"
    if beside.exists() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("vaultflow")


def _apt_install(packages: list[str]) -> None:
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        log.warning("cannot install %s: not root or no apt-get", " ".join(packages))
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    log.info("installing %s with apt-get", " ".join(packages))
    subprocess.run(["apt-get", "update", "-qq"], env=env, check=False, stdout=subprocess.DEVNULL)
    subprocess.run(["apt-get", "install", "-y", "-qq", *packages], env=env, check=False,
                   stdout=subprocess.DEVNULL)


def _version(argv: list[str]) -> str | None:
    try:
        done = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=120,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (done.stdout.strip() or done.stderr.strip()).splitlines()
    return text[0] if done.returncode == 0 and text else None


def locate(tools: list[str]) -> dict[str, Program]:
    """Find each tool; apt-get install restic/borg first if they are asked for and missing."""
    missing = [DEBIAN_PACKAGES[t] for t in tools if t in DEBIAN_PACKAGES and not shutil.which(t)]
    if missing:
        _apt_install(missing)
    found: dict[str, Program] = {}
    for tool in tools:
        path = _which_vaultflow() if tool == "vaultflow" else shutil.which(tool)
        version = None
        if path and tool != "vaultflow":
            version = _version([path, "version" if tool == "restic" else "--version"])
        elif path:
            version = _vaultflow_version()
        found[tool] = Program(tool, path, version)
    return found


def _vaultflow_version() -> str | None:
    try:
        from importlib.metadata import version

        return f"vaultflow {version('vaultflow')}"
    except Exception:  # noqa: BLE001 - any failure means "unknown", never a crash
        return None
