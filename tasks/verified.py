"""When each pack was last read and authenticated (`check --read-data[-subset]`): a small state file per repository.

The repository cannot hold it (a reader must not need write access, and a deleted pack's history is moot), so it
lives beside the head witness: `VAULTFLOW_HOME/verified/<repository id>.json`, {pack: unix time}. It is evidence
for `metrics` and `audit` on the machine that runs `check`, never a proof: a damaged file is reported, not trusted.
"""

from __future__ import annotations

import fcntl
import json
import logging
import re
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vaultflow.storage.checker import Checker
from vaultflow.storage.errors import IntegrityError, VaultflowError
from vaultflow.storage.witness import write_json_atomically

from . import settings

VERIFIED_VERSION = 1
_REPOSITORY_ID = re.compile(r"^[0-9a-f]{8,64}$")
DAY = 86400.0


def state_path(repository_id: str) -> Path:
    if not _REPOSITORY_ID.match(repository_id):
        raise VaultflowError(f"repository id {repository_id!r} is not a hex id; the repository config is odd, "
                             "run `vaultflow check`")
    return settings.vaultflow_home() / "verified" / f"{repository_id}.json"


def load_verified(repository_id: str) -> dict[str, float]:
    """{pack: unix time it was last read and authenticated}; no file means nothing was verified on this machine."""
    path = state_path(repository_id)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return {}
    try:
        body = json.loads(data)
        if body.get("vaultflow_verified") != VERIFIED_VERSION or body.get("repository") != repository_id:
            raise ValueError("wrong version or repository")
        return {str(pack): float(when) for pack, when in body["packs"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise IntegrityError(str(path), f"pack verification state is damaged ({e})",
                             "move it aside; the next `vaultflow check --read-data` starts a new one") from None


def record_verified(repository_id: str, packs: Iterable[str], when: float | None = None,
                    present: Iterable[str] | None = None) -> int:
    """Remember that `packs` were read and authenticated at `when` (default now); returns how many were recorded.

    A pack's time only moves forward. `present` (every pack storage holds now), when given, drops packs that are
    gone (pruned), so the file does not grow forever. Safe against concurrent checks on this machine (flock)."""
    when = time.time() if when is None else float(when)
    packs = list(packs)
    path = state_path(repository_id)
    with _locked(path):
        state = load_verified(repository_id)
        for pack in packs:
            state[pack] = max(state.get(pack, 0.0), when)
        if present is not None:
            keep = set(present)
            state = {p: t for p, t in state.items() if p in keep}
        _write(path, {"vaultflow_verified": VERIFIED_VERSION, "repository": repository_id,
                      "packs": dict(sorted(state.items()))})
    return len(packs)


def record_check(checker: Checker | None, pack_batches: Iterable[Iterable[str]], when: float | None = None) -> int:
    """What the check flow calls after its pack batches were read: records every pack read except those the
    check found damaged, and forgets packs storage no longer holds (the checker listed them). Never fails the
    check: this file is evidence for reports, so a write that fails is logged and the check goes on."""
    read = [p for batch in pack_batches for p in batch]
    if checker is None or not read:
        return 0  # a structure-only check verified no bytes
    bad = {p.object for p in checker.report.problems if p.kind == "pack"}
    try:
        return record_verified(checker.repo.config.id, [p for p in read if p not in bad], when,
                               present=checker.pack_sizes)
    except (OSError, VaultflowError) as e:
        logging.getLogger(__name__).warning("packs were verified, but %s could not record it: %s",
                                            state_path(checker.repo.config.id), e)
        return 0


@dataclass(frozen=True)
class Coverage:
    """How much of the repository's current data was read and authenticated within `days`."""

    days: float
    packs: int  # packs storage holds now
    verified: int  # of them, read and authenticated within `days`
    never: int  # of them, never verified on this machine
    oldest: float | None  # unix time of the least recent verification among the verified packs (None: none)

    @property
    def ratio(self) -> float:
        """Share verified within the window; an empty repository has nothing left unverified."""
        return self.verified / self.packs if self.packs else 1.0


def coverage(verified: Mapping[str, float], packs: Iterable[str], now: float, days: float) -> Coverage:
    """Coverage of `packs` (the current pack list) by `verified` (load_verified) as of `now`."""
    since = now - days * DAY
    current = list(packs)
    times = [verified[p] for p in current if p in verified]
    return Coverage(days=days, packs=len(current), verified=sum(1 for t in times if t >= since),
                    never=len(current) - len(times), oldest=min(times) if times else None)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)  # released when the file closes
        yield


def _write(path: Path, body: dict[str, Any]) -> None:
    write_json_atomically(path, json.dumps(body, indent=0, sort_keys=False).encode() + b"\n")
