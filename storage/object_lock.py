"""Keeping what is still needed under S3 Object Lock, object by object and only as far as needed (§14).

Extending every object's retention on every maintenance run would keep released data stored for ever
(kopia#4894); extending nothing would let the store release data a snapshot still needs. Prune extends, after
its sweep, exactly the objects a repository still needs whose retention ends within half the configured period.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from .maintenance import deletion_candidates
from .manifest import snapshots_name
from .repository import Repository
from .snapshot import forgotten


def needed(repo: Repository) -> Iterator[str]:
    """Every stored object the repository still needs: config and keys, every index file and pack except prune's
    deletion candidates, the chain's records (tombstones too: the chain links through them) except forgotten
    ones, the manifests and rows of live snapshots, and the current candidates objects."""
    records = repo.snapshots(everything=True)
    gone = forgotten(records)
    candidates = set(deletion_candidates(repo))
    yield "config"
    for prefix in ("keys", "index", "maintenance"):
        yield from (name for name, _ in repo.backend.list(prefix))
    yield from (name for name, _ in repo.backend.list("data") if name not in candidates)
    for rid, rec in records.items():
        if rid in gone:
            continue
        yield f"snapshots/{rid}"
        yield from rec.manifests
        if not rec.is_tombstone:
            yield snapshots_name(rec.source, rec.serial)


def extend_needed(repo: Repository, now: float | None = None) -> tuple[int, int]:
    """Extend the retention of needed objects that end within half the period to now + the period; returns
    (objects looked at, objects extended). A repository without Object Lock: (0, 0)."""
    if repo.config.object_lock is None:
        return 0, 0
    now = time.time() if now is None else now
    period = int(repo.config.object_lock["days"]) * 86400.0
    looked = extended = 0
    for name in needed(repo):
        if not repo.backend.exists(name):
            continue  # a row not written yet, or a lost object: check's business
        looked += 1
        until = repo.backend.retained_until(name)
        if until is None or until < now + period / 2:
            repo.backend.extend_retention(name, now + period)
            extended += 1
    return looked, extended
