"""Head witnesses (format §11): a local high-water mark per repository and source, and comparing heads with them.

A repository cannot prove that its newest record was not deleted; a witness kept outside it can.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import IntegrityError, VaultflowError
from .snapshot import SnapshotRecord, utc_now

WITNESS_VERSION = 1
_REPOSITORY_ID = re.compile(r"^[0-9a-f]{8,64}$")


@dataclass(frozen=True)
class Head:
    """The newest record of one source that a witness has seen."""

    serial: int
    id: str
    seen: str = ""  # UTC time the witness recorded it
    by: str = ""  # what recorded it: "backup" (after its commit) or "check"


@dataclass(frozen=True)
class ForkAlarm:
    """One serial seen with two record ids; kept until a person removes it, since later serials move on."""

    source: str
    serial: int
    id: str  # the record id the witness held
    other: str  # the record id offered later for the same serial
    seen: str


@dataclass(frozen=True)
class Sighting:
    """One witness's claim that `source` had record `id` at `serial`; `who` says where the claim comes from."""

    source: str
    serial: int
    id: str
    who: str  # e.g. "recorded by this machine's witness at T" or "committed by flow run R at T"


@dataclass(frozen=True)
class Finding:
    kind: str  # "rollback" or "fork"
    source: str
    serial: int
    message: str


@dataclass
class WitnessState:
    sources: dict[str, Head] = field(default_factory=dict)
    forks: list[ForkAlarm] = field(default_factory=list)


def repository_heads(records: Mapping[str, SnapshotRecord]) -> dict[str, Head]:
    """The record with the highest serial of each source (serials order history, clocks do not)."""
    heads: dict[str, Head] = {}
    for rid, rec in records.items():
        head = heads.get(rec.source)
        if head is None or (rec.serial, rid) > (head.serial, head.id):
            heads[rec.source] = Head(rec.serial, rid)
    return heads


def compare(records: Mapping[str, SnapshotRecord], sightings: Iterable[Sighting]) -> list[Finding]:
    """Rollbacks (a witnessed serial above the source's head) and forks (a witnessed serial held by another id).

    A witnessed serial below the head that is simply absent is not a finding: retention may have removed it.
    """
    heads = repository_heads(records)
    by_serial = {(rec.source, rec.serial): rid for rid, rec in records.items()}
    highest: dict[str, Sighting] = {}
    found: list[Finding] = []
    for s in sightings:
        top = highest.get(s.source)
        if top is None or s.serial > top.serial:
            highest[s.source] = s
        rid = by_serial.get((s.source, s.serial))
        if rid is not None and rid != s.id:
            found.append(Finding("fork", s.source, s.serial,
                                 f"source {s.source!r}: fork: serial {s.serial} is record {rid[:12]} in the "
                                 f"repository, but record {s.id[:12]} was {s.who}"))
    for source, s in sorted(highest.items()):
        head = heads.get(source)
        if head is not None and s.serial <= head.serial:
            continue
        newest = f"serial {head.serial}" if head else "gone: it holds no record of this source"
        found.append(Finding("rollback", source, s.serial,
                             f"source {source!r}: rollback: serial {s.serial} ({s.who}) is missing; the newest "
                             f"record in the repository is {newest} (records were deleted: restore them from a "
                             "copy of the repository, and find out who could delete them)"))
    return _unique(found)


def _unique(findings: Iterable[Finding]) -> list[Finding]:
    seen: set[tuple[str, str, int]] = set()
    out = []
    for f in findings:
        if (f.kind, f.source, f.serial) not in seen:
            seen.add((f.kind, f.source, f.serial))
            out.append(f)
    return out


def write_json_atomically(path: Path, data: bytes) -> None:
    """Replace `path` with `data` atomically (temp file, fsync, rename): a crash leaves the old state or the new
    one, never half of one. Local state files (witness, verification times) share it."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class LocalWitness:
    """`<folder>/<repository id>.json`: the highest serial and record id this machine saw per source.

    Updated atomically (temp file, fsync, rename) under an flock on `<repository id>.lock`, so concurrent
    backups and checks on this machine never lose each other's updates. It only moves forward.
    """

    def __init__(self, folder: Path | str, repository_id: str) -> None:
        if not _REPOSITORY_ID.match(repository_id):
            raise VaultflowError(f"repository id {repository_id!r} is not a hex id; the repository config is odd, "
                                 "run `vaultflow check`")
        self.folder = Path(folder)
        self.repository_id = repository_id
        self.path = self.folder / f"{repository_id}.json"

    def load(self) -> WitnessState:
        """The recorded heads; a missing file is an empty witness, a damaged one raises IntegrityError."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return WitnessState()
        try:
            body = json.loads(data)
            if body.get("vaultflow_witness") != WITNESS_VERSION or body.get("repository") != self.repository_id:
                raise ValueError("wrong version or repository")
            return WitnessState({name: Head(**h) for name, h in body["sources"].items()},
                                [ForkAlarm(**f) for f in body.get("forks", [])])
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise IntegrityError(str(self.path), f"head witness file is damaged ({e})",
                                 "it no longer proves the heads; move it aside and run `vaultflow check` to start "
                                 "a new one from the repository's current heads") from None

    def sightings(self, state: WitnessState) -> list[Sighting]:
        return [Sighting(name, h.serial, h.id, f"recorded by this machine's witness at {h.seen}")
                for name, h in sorted(state.sources.items())]

    def alarms(self, state: WitnessState) -> list[Finding]:
        """The forks this witness saw earlier: reported until a person removes them from the file."""
        return [Finding("fork", f.source, f.serial,
                        f"source {f.source!r}: fork: serial {f.serial} was record {f.id[:12]} in this machine's "
                        f"witness and was committed again as record {f.other[:12]} at {f.seen} (a rollback followed "
                        f"by a new backup); after investigating, remove the alarm from {self.path}")
                for f in state.forks]

    def findings(self, records: Mapping[str, SnapshotRecord], state: WitnessState | None = None) -> list[Finding]:
        """Compare the repository's records with this witness: its heads, then its stored fork alarms."""
        state = state if state is not None else self.load()
        return _unique([*compare(records, self.sightings(state)), *self.alarms(state)])

    def advance(self, heads: Mapping[str, Head], by: str) -> list[Finding]:
        """Record newer heads; returns the forks found (a known serial offered with another id), which are kept."""
        found: list[Finding] = []
        with self._locked():
            state = self.load()
            now = utc_now()
            changed = False
            for source, head in sorted(heads.items()):
                old = state.sources.get(source)
                if old is None or head.serial > old.serial:
                    state.sources[source] = Head(head.serial, head.id, now, by)
                    changed = True
                elif head.serial == old.serial and head.id != old.id:
                    alarm = ForkAlarm(source, head.serial, old.id, head.id, now)
                    if not any((a.source, a.serial, a.other) == (source, head.serial, head.id) for a in state.forks):
                        state.forks.append(alarm)
                        changed = True
                    found.append(Finding("fork", source, head.serial,
                                         f"source {source!r}: fork: serial {head.serial} was record {old.id[:12]} "
                                         f"when this machine's witness recorded it at {old.seen}, and is now "
                                         f"record {head.id[:12]}"))
            if changed:
                self._write(state)
        return found

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / f"{self.repository_id}.lock", "a+b") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)  # released when the file closes
            yield

    def _write(self, state: WitnessState) -> None:
        body: dict[str, Any] = {"vaultflow_witness": WITNESS_VERSION, "repository": self.repository_id,
                                "sources": {k: asdict(v) for k, v in sorted(state.sources.items())},
                                "forks": [asdict(f) for f in state.forks]}
        write_json_atomically(self.path, json.dumps(body, indent=1, sort_keys=True).encode() + b"\n")
        dfd = os.open(self.folder, os.O_RDONLY)
        try:
            os.fsync(dfd)  # the rename itself must survive a crash
        finally:
            os.close(dfd)
