"""Snapshot records: the commit point of a backup, MAC'd and hash-chained per source.

A record is canonical JSON plus a keyed-BLAKE3 MAC, stored as `snapshots/<blake3 of its bytes>`; with private
manifests its descriptive fields are sealed deterministically (SIV-style), so a retry names the same object.
"""

from __future__ import annotations

import base64
import hmac
import json
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .crypto import NONCE_SIZE, OVERHEAD, content_hash, derive_subkey, keyed_hash
from .errors import IntegrityError

FORMAT_VERSION = 1
# What a private record leaves readable: enough to attribute a damaged record to its source and serial, so a
# backup never reuses that serial and check can place it in the chain (docs/format.md §6).
CLEAR_FIELDS = ("format_version", "source", "serial", "previous")
SEALED = "sealed"
SEAL_AAD = b"vaultflow snapshot record v1"


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
    # Set on a tombstone: a record in the chain that says which earlier records a policy removed (§6). Absent
    # from the encoding when unset, so records written before tombstones existed keep their bytes and names.
    tombstone: dict[str, Any] | None = None

    def body(self) -> dict[str, Any]:
        body = asdict(self)
        if body["tombstone"] is None:
            del body["tombstone"]
        return body

    @property
    def is_tombstone(self) -> bool:
        return self.tombstone is not None

    def removed(self) -> dict[str, int]:
        """The records (id → serial) a tombstone removed; empty for a snapshot."""
        if self.tombstone is None:
            return {}
        return {str(r["id"]): int(r["serial"]) for r in self.tombstone.get("removed", [])}


def _canonical(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


@dataclass(frozen=True)
class DamagedRecord:
    """A record that failed to parse or authenticate; `source` and `serial` are what it claims, unverified."""

    name: str
    reason: str
    source: str | None = None
    serial: int | None = None


def _seal_keys(record_key: bytes) -> tuple[AESGCM, bytes]:
    # Derived from the record MAC key (BLAKE3's derive-key mode is domain-separated from its keyed mode), so every
    # reader that can authenticate a record can also open it.
    return (AESGCM(derive_subkey(record_key, "snapshot record encryption")),
            derive_subkey(record_key, "snapshot record nonce"))


def _seal(record_key: bytes, clear: dict[str, Any], hidden: dict[str, Any]) -> str:
    """nonce || AES-GCM(hidden) in base64; the nonce is a keyed hash of everything sealed (SIV-style), so equal
    records encrypt to equal bytes and different ones reuse a nonce only on a 96-bit collision."""
    aead, nonce_key = _seal_keys(record_key)
    aad, plain = SEAL_AAD + _canonical(clear), _canonical(hidden)
    nonce = keyed_hash(nonce_key, len(aad).to_bytes(8, "little") + aad + plain)[:NONCE_SIZE]
    return base64.b64encode(nonce + aead.encrypt(nonce, plain, aad)).decode()


def _unseal(record_key: bytes, clear: dict[str, Any], sealed: str, obj: str) -> dict[str, Any]:
    raw = base64.b64decode(sealed, validate=True)
    if len(raw) < OVERHEAD:
        raise IntegrityError(obj, f"sealed part of the snapshot record is {len(raw)} bytes, shorter than {OVERHEAD}")
    aead, _ = _seal_keys(record_key)
    try:
        hidden = json.loads(aead.decrypt(raw[:NONCE_SIZE], raw[NONCE_SIZE:], SEAL_AAD + _canonical(clear)))
    except InvalidTag:
        raise IntegrityError(obj, "sealed part of the snapshot record does not authenticate") from None
    if not isinstance(hidden, dict):
        raise ValueError("sealed part is not an object")
    return hidden


def encode_record(record_key: bytes, record: SnapshotRecord, private: bool = False) -> tuple[str, bytes]:
    """(id, bytes) of a record; the id is the BLAKE3 hash of the bytes, so the name authenticates content too.

    Deterministic: the same record always gives the same bytes, so a retried commit writes the same object.
    """
    body = record.body()
    if private:
        clear = {k: body[k] for k in CLEAR_FIELDS}
        body = {**clear, SEALED: _seal(record_key, clear, {k: v for k, v in body.items() if k not in clear})}
    data = _canonical({"record": body, "mac": keyed_hash(record_key, _canonical(body)).hex()}) + b"\n"
    return content_hash(data), data


def decode_record(record_key: bytes, data: bytes, obj: str, expected_id: str | None = None) -> SnapshotRecord:
    """Parse and authenticate a record; a changed byte anywhere raises IntegrityError naming `obj`.

    Only the exact canonical encoding is accepted, so a record has one spelling and one name.
    """
    if expected_id is not None and content_hash(data) != expected_id:
        raise IntegrityError(obj, "snapshot record does not hash to its name (modified or corrupted)")
    try:  # hostile bytes: any parser failure (deep nesting's RecursionError too) is damage, never a crash
        outer = json.loads(data)
        body, mac = outer["record"], bytes.fromhex(outer["mac"])
        if not isinstance(body, dict):
            raise TypeError("record is not an object")
        authentic = hmac.compare_digest(keyed_hash(record_key, _canonical(body)), mac)
    except Exception as e:
        raise IntegrityError(obj, f"snapshot record is not valid JSON (corrupted: {type(e).__name__})") from None
    if not authentic:
        raise IntegrityError(obj, "snapshot record MAC mismatch (forged, modified or from another repository)")
    if body.get("format_version") != FORMAT_VERSION:
        raise IntegrityError(obj, f"snapshot record format {body.get('format_version')} is not {FORMAT_VERSION}")
    private = SEALED in body
    try:
        if private:
            clear = {k: v for k, v in body.items() if k != SEALED}
            body = {**clear, **_unseal(record_key, clear, body[SEALED], obj)}
        record = SnapshotRecord(**body)
        canonical = encode_record(record_key, record, private)[1]
    except IntegrityError:
        raise
    except Exception as e:
        raise IntegrityError(obj, f"snapshot record has unexpected content ({type(e).__name__}: {e})") from None
    if canonical != data:
        raise IntegrityError(obj, "snapshot record is not in its canonical encoding (modified)")
    return record


def peek_record(data: bytes) -> tuple[str | None, int | None]:
    """The source and serial a record claims, read without any check: only for reporting a damaged record."""
    try:
        body = json.loads(data)["record"]
        source, serial = body.get("source"), body.get("serial")
    except Exception:
        return None, None
    return (source if isinstance(source, str) else None,
            serial if isinstance(serial, int) and not isinstance(serial, bool) else None)


def forgotten(records: dict[str, SnapshotRecord]) -> dict[str, tuple[str, int]]:
    """Every record id a tombstone of its source removed → (that tombstone's id, the serial it named)."""
    out: dict[str, tuple[str, int]] = {}
    for tid, rec in records.items():
        for rid, serial in rec.removed().items():
            out[rid] = (tid, serial)
    return out


def chain_problems(records: dict[str, SnapshotRecord]) -> list[str]:
    """Gaps, forks, rollbacks and broken links in each source's hash chain, as readable sentences.

    `records` holds snapshots and tombstones. A missing predecessor that a later tombstone of the same source
    names, with that id and serial, was removed by policy: not a gap. Anything else missing is."""
    problems: list[str] = []
    removed = forgotten(records)
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
            by = removed.get(rec.previous or "")
            if prev is None and by is not None:
                tomb = records[by[0]]
                if by[1] != rec.serial - 1 or tomb.source != source or tomb.serial <= by[1]:
                    problems.append(f"{where}: broken chain: tombstone {by[0][:12]} names its predecessor "
                                    f"{str(rec.previous)[:12]} as serial {by[1]}, not {rec.serial - 1}")
            elif rec.previous is None or prev is None:
                problems.append(f"{where}: gap: the record of serial {rec.serial - 1} is missing "
                                f"(deleted, and no forget recorded it); expected {str(rec.previous)[:12]}")
            elif prev.source != source or prev.serial != rec.serial - 1:
                problems.append(f"{where}: broken chain: predecessor {rec.previous[:12]} is "
                                f"{prev.source!r} serial {prev.serial}")
            elif rec.started < prev.finished:
                problems.append(f"{where}: rollback: started {rec.started} before its predecessor finished "
                                f"{prev.finished} (clock forged or wrong)")
        for rid, rec in recs:  # a tombstone removes only earlier records of its own source
            for gone, serial in rec.removed().items():
                if serial >= rec.serial:
                    problems.append(f"source {source!r} tombstone {rec.serial} ({rid[:12]}): claims to remove "
                                    f"serial {serial} ({gone[:12]}), which is not older than itself")
                elif gone in records and (records[gone].source, records[gone].serial) != (source, serial):
                    problems.append(f"source {source!r} tombstone {rec.serial} ({rid[:12]}): names {gone[:12]} "
                                    f"as {source}#{serial}, but it is {records[gone].source}#{records[gone].serial}")
    return problems
