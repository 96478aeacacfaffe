"""Retention: which snapshots a policy keeps, and the tombstone record that removes the rest (§6 of the format).

Restic's keep rules, with one deliberate difference in what orders history: each source's **chain** (serial
numbers), never the clock a client claims. A snapshot's time for bucketing is its `started`, clamped to be no
earlier than its predecessor's and no later than now, so a record forged with an old timestamp cannot fill an
old bucket and push a genuine snapshot out, and one forged in the future cannot pose as the newest.
"""

from __future__ import annotations

import re
import socket
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta

from .errors import ObjectExists, ObjectLocked, VaultflowError
from .repository import Repository
from .snapshot import SnapshotRecord, forgotten, parse_utc, utc_now

_DURATION = re.compile(r"^(?:(\d+)y)?(?:(\d+)m)?(?:(\d+)d)?(?:(\d+)h)?$")
BUCKETS = ("hourly", "daily", "weekly", "monthly", "yearly")


@dataclass(frozen=True)
class Policy:
    last: int = 0
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    yearly: int = 0
    within: str = ""  # restic's form: 1y2m3d4h, relative to the source's newest snapshot
    tags: tuple[str, ...] = ()

    def empty(self) -> bool:
        return not (self.last or any(getattr(self, b) for b in BUCKETS) or self.within or self.tags)

    def describe(self) -> str:
        parts = [f"keep-last {self.last}"] if self.last else []
        parts += [f"keep-{b} {getattr(self, b)}" for b in BUCKETS if getattr(self, b)]
        parts += [f"keep-within {self.within}"] if self.within else []
        parts += [f"keep-tag {t}" for t in self.tags]
        return ", ".join(parts)


def within_delta(text: str) -> timedelta:
    """restic's duration `1y2m3d4h`: years of 365 days and months of 30 (restic counts calendar units; our
    difference is documented)."""
    m = _DURATION.match(text)
    if not text or m is None:
        raise VaultflowError(f"--keep-within {text!r}: write a duration like 1y2m3d4h (years, months, days, hours)")
    y, mo, d, h = (int(g or 0) for g in m.groups())
    return timedelta(days=365 * y + 30 * mo + d, hours=h)


@dataclass
class Decision:
    keep: dict[str, list[str]] = field(default_factory=dict)  # id -> why it is kept
    remove: list[str] = field(default_factory=list)  # ids, newest first


def effective_times(chain: list[tuple[str, SnapshotRecord]], now: datetime) -> dict[str, datetime]:
    """Each snapshot's time for retention, oldest first: its claimed start, but never before its predecessor's
    and never after `now`."""
    out: dict[str, datetime] = {}
    floor = datetime.min.replace(tzinfo=UTC)
    for rid, rec in chain:
        t = min(max(parse_utc(rec.started), floor), now)
        out[rid] = floor = t
    return out


def _bucket(kind: str, t: datetime) -> tuple[int, ...]:
    if kind == "hourly":
        return (t.year, t.month, t.day, t.hour)
    if kind == "daily":
        return (t.year, t.month, t.day)
    if kind == "weekly":
        iso = t.isocalendar()
        return (iso.year, iso.week)
    if kind == "monthly":
        return (t.year, t.month)
    return (t.year,)


def decide(chain: list[tuple[str, SnapshotRecord]], policy: Policy, now: datetime) -> Decision:
    """Which snapshots of one source (`chain`: its live snapshots, any order) `policy` keeps.

    The newest snapshot is always kept (restic would let `--keep-tag` alone remove it); otherwise restic's rules:
    keep-last N newest; per bucket kind the newest snapshot of each of the N most recent buckets that have one;
    keep-within D everything within D of the newest; keep-tag T every snapshot tagged T."""
    if policy.empty():
        raise VaultflowError("no keep rule given: name at least one --keep-… rule (forget never removes every "
                             "snapshot by default)")
    chain = sorted(chain, key=lambda item: item[1].serial)
    times = effective_times(chain, now)
    newest_first = list(reversed(chain))
    out = Decision()

    def keep(rid: str, why: str) -> None:
        out.keep.setdefault(rid, []).append(why)

    if newest_first:
        keep(newest_first[0][0], "newest")
    for rid, _ in newest_first[:policy.last]:
        keep(rid, "last")
    for kind in BUCKETS:
        n = getattr(policy, kind)
        seen: list[tuple[int, ...]] = []
        for rid, _ in newest_first:
            b = _bucket(kind, times[rid])
            if b not in seen and len(seen) < n:
                seen.append(b)
                keep(rid, kind)
    if policy.within and newest_first:
        limit = times[newest_first[0][0]] - within_delta(policy.within)
        for rid, _ in newest_first:
            if times[rid] >= limit:
                keep(rid, f"within {policy.within}")
    for rid, rec in newest_first:
        for tag in policy.tags:
            if tag in rec.tags:
                keep(rid, f"tag {tag}")
    out.remove = [rid for rid, _ in newest_first if rid not in out.keep]
    return out


def tombstone(source: str, serial: int, previous: str | None, policy: Policy,
              removed: list[tuple[str, SnapshotRecord]], kept: list[str], version: str) -> SnapshotRecord:
    """The record that removes `removed` from `source`'s chain: takes the next serial and links to the head, so
    check can tell a policy's removal (named here, authenticated) from a deleted or rolled-back record."""
    now = utc_now()
    body = {"reason": "forget", "policy": policy.describe(), "policy_rules": asdict(policy),
            "removed": [{"id": rid, "serial": rec.serial, "started": rec.started}
                        for rid, rec in sorted(removed, key=lambda item: item[1].serial)],
            "kept": sorted(kept)}
    return SnapshotRecord(source=source, serial=serial, started=now, finished=now, host=socket.gethostname(),
                          parent=None, previous=previous, manifests={}, vaultflow_version=version, tombstone=body)


@dataclass
class Quarantined:
    id: str
    source: str | None  # None: neither a successor nor the record itself says which chain it was in
    serial: int | None
    reason: str
    tombstone: str | None


def quarantine_damaged(repo: Repository, version: str, host: str | None = None) -> list[Quarantined]:
    """`repair snapshots`: move every damaged record out of `snapshots/` into `quarantine/snapshots/` (kept for
    inspection, never read again) and record each removal with a tombstone (reason "quarantine") in its source's
    chain, so check sees a recorded repair, not a gap. Which chain and serial: from the good record that links to
    it (authenticated), else what the damaged record claims. Order: copy → tombstone → delete; a re-run after a
    crash finds what is left and finishes."""
    repo.snapshots(everything=True)
    damaged = dict(repo.damaged_records)
    named = forgotten(repo.chain_records)
    successors = {r.previous: (r.source, r.serial - 1) for r in repo.chain_records.values() if r.previous}
    out: list[Quarantined] = []
    by_source: dict[str, list[tuple[str, int]]] = {}
    for rid, d in sorted(damaged.items()):
        source, serial = successors.get(rid, (d.source, d.serial))
        data = repo.backend.read(d.name)
        try:
            repo.backend.write(f"quarantine/snapshots/{rid}", data)
        except ObjectExists:
            pass  # a re-run: the copy is there
        q = Quarantined(rid, source, serial, d.reason, named.get(rid, (None, 0))[0])
        out.append(q)
        if source is not None and serial is not None and q.tombstone is None:
            by_source.setdefault(source, []).append((rid, serial))
    for source, gone in sorted(by_source.items()):
        with repo.lock(purpose="repair snapshots", scope=f"source:{source}") as lock:
            repo.snapshots(everything=True)
            head = repo.chain_head(source)
            serial_now = repo.next_serial(source)
            # a damaged head is the tombstone's predecessor: the chain links through what it removes
            previous = next((rid for rid, s in gone if s == serial_now - 1), head[0] if head else None)
            now = utc_now()
            record = SnapshotRecord(
                source=source, serial=serial_now, started=now, finished=now,
                host=host or socket.gethostname(), parent=None, previous=previous, manifests={},
                vaultflow_version=version, tombstone={
                    "reason": "quarantine", "policy": "repair snapshots: damaged record quarantined",
                    "removed": [{"id": rid, "serial": serial, "started": ""} for rid, serial in sorted(gone)],
                    "kept": []})
            lock.verify()
            tid = repo.commit(record)
        for q in out:
            if q.source == source and q.tombstone is None:
                q.tombstone = tid
    for q in out:
        if q.tombstone is not None or q.source is None:
            try:
                repo.backend.delete(f"snapshots/{q.id}")
            except ObjectLocked:
                q.reason += "; still retained by Object Lock, deleted by a later repair"
    return out
