"""Snapshot records: the commit point of a backup, MAC'd and hash-chained per source.

A record is canonical JSON plus a keyed-BLAKE3 MAC, stored as `snapshots/<blake3 of its bytes>`.
"""

from __future__ import annotations

import hmac
import json
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from .crypto import content_hash, keyed_hash
from .errors import IntegrityError

FORMAT_VERSION = 1


def parse_utc(text: str) -> datetime:
    """The datetime of a record time written by utc_now()."""
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def utc_now() -> str:
    """UTC time as ISO 8601 with microseconds and a Z, so records sort and compare as text."""
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class SnapshotRecord:
    """What one backup of one source committed."""

    source: str
    serial: int  # strictly increasing per source, starting at 1
    started: str  # UTC ISO 8601
    finished: str
    host: str
    parent: str | None  # id of the snapshot used for change detection
    previous: str | None  # id of the record with serial - 1 of this source (the hash chain)
    manifests: dict[str, str]  # object name -> BLAKE3 of its bytes
    index_files: list[str] = field(default_factory=list)  # index files this backup wrote
    stats: dict[str, int | float] = field(default_factory=dict)
    paths: list[str] = field(default_factory=list)  # what was backed up, as the user named it
    tags: list[str] = field(default_factory=list)
    vaultflow_version: str = ""
    format_version: int = FORMAT_VERSION

    def body(self) -> dict[str, Any]:
        return asdict(self)


def _canonical(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def encode_record(record_key: bytes, record: SnapshotRecord) -> tuple[str, bytes]:
    """(id, bytes) of a record; the id is the BLAKE3 hash of the bytes, so the name authenticates content too."""
    body = record.body()
    data = _canonical({"record": body, "mac": keyed_hash(record_key, _canonical(body)).hex()}) + b"\n"
    return content_hash(data), data


def decode_record(record_key: bytes, data: bytes, obj: str, expected_id: str | None = None) -> SnapshotRecord:
    """Parse and authenticate a record; a changed byte anywhere raises IntegrityError naming `obj`."""
    if expected_id is not None and content_hash(data) != expected_id:
        raise IntegrityError(obj, "snapshot record does not hash to its name (modified or corrupted)")
    try:
        outer = json.loads(data)
        body, mac = outer["record"], bytes.fromhex(outer["mac"])
    except (ValueError, KeyError, TypeError):
        raise IntegrityError(obj, "snapshot record is not valid JSON (corrupted)") from None
    if not hmac.compare_digest(keyed_hash(record_key, _canonical(body)), mac):
        raise IntegrityError(obj, "snapshot record MAC mismatch (forged, modified or from another repository)")
    if body.get("format_version") != FORMAT_VERSION:
        raise IntegrityError(obj, f"snapshot record format {body.get('format_version')} is not {FORMAT_VERSION}")
    try:
        return SnapshotRecord(**body)
    except TypeError as e:
        raise IntegrityError(obj, f"snapshot record has unexpected fields ({e})") from None


def chain_problems(records: dict[str, SnapshotRecord]) -> list[str]:
    """Gaps, forks, rollbacks and broken links in each source's hash chain, as readable sentences."""
    problems: list[str] = []
    by_source: dict[str, list[tuple[str, SnapshotRecord]]] = {}
    for rid, rec in records.items():
        by_source.setdefault(rec.source, []).append((rid, rec))
    for source, recs in sorted(by_source.items()):
        recs.sort(key=lambda item: (item[1].serial, item[0]))
        seen: dict[int, str] = {}
        for rid, rec in recs:
            where = f"source {source!r} snapshot {rec.serial} ({rid[:12]})"
            if rec.serial in seen:
                problems.append(f"{where}: fork: serial {rec.serial} is also used by {seen[rec.serial][:12]}")
                continue
            seen[rec.serial] = rid
            if rec.serial == 1:
                if rec.previous is not None:
                    problems.append(f"{where}: first snapshot claims a predecessor {rec.previous[:12]}")
                continue
            prev = records.get(rec.previous or "")
            if rec.previous is None or prev is None:
                problems.append(f"{where}: gap: the record of serial {rec.serial - 1} is missing "
                                f"(deleted?); expected {str(rec.previous)[:12]}")
            elif prev.source != source or prev.serial != rec.serial - 1:
                problems.append(f"{where}: broken chain: predecessor {rec.previous[:12]} is "
                                f"{prev.source!r} serial {prev.serial}")
            elif rec.started < prev.finished:
                problems.append(f"{where}: rollback: started {rec.started} before its predecessor finished "
                                f"{prev.finished} (clock forged or wrong)")
    return problems
