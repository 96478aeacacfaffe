"""The deletion candidates object of prune's two phases: pack → since when it is a candidate (format §15).

MAC'd with a subkey of the master key; content-named under `maintenance/`. Backups and check read it too.
"""

from __future__ import annotations

import hmac
import json
import re
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from .crypto import content_hash, keyed_hash
from .errors import IntegrityError, ObjectMissing

if TYPE_CHECKING:  # upload and checker import this module, and repository imports upload
    from .repository import Repository

CANDIDATES = "maintenance/candidates-"
MAC_PURPOSE = "maintenance mac"  # BLAKE3.derive_key("vaultflow 2026-11-25 maintenance mac", master key)
MAX_OBJECT = 256 << 20  # ~2 million candidates; anything larger is not read (junk must not exhaust memory)
_PACK_NAME = re.compile(r"^data/[0-9a-f]{2}/[0-9a-f]{64}$")
_TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")


def iso(t: float) -> str:
    """UTC seconds as `YYYY-MM-DDTHH:MM:SSZ`: compares as text."""
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def seconds(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _canonical(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def encode(repo: Repository, packs: dict[str, str]) -> tuple[str, bytes]:
    """(name, bytes) of a candidates object listing `packs` (pack → since)."""
    body = {"format_version": 1, "repository": repo.config.id, "packs": dict(sorted(packs.items()))}
    mac = keyed_hash(repo.master.subkey(MAC_PURPOSE), _canonical(body)).hex()
    data = _canonical({"deletion_candidates": body, "mac": mac}) + b"\n"
    return f"{CANDIDATES}{content_hash(data)}", data


def decode(repo: Repository, name: str, data: bytes) -> dict[str, str]:
    """The packs of an authenticated candidates object; only the exact bytes `encode` writes are accepted."""
    if content_hash(data) != name[len(CANDIDATES):]:
        raise IntegrityError(name, "candidates object does not hash to its name (modified or corrupted)")
    try:
        body = json.loads(data)["deletion_candidates"]
        packs = dict(body["packs"])
        fine = body.get("format_version") == 1 and body.get("repository") == repo.config.id and all(
            isinstance(k, str) and _PACK_NAME.match(k) and isinstance(v, str) and _TIME.match(v)
            for k, v in packs.items())
        same = hmac.compare_digest(encode(repo, packs)[1], data) if fine else False
    except Exception as e:  # hostile bytes: any parser failure is damage, never a crash
        raise IntegrityError(name, f"candidates object is malformed ({type(e).__name__})") from None
    if not same:
        raise IntegrityError(name, "candidates object does not authenticate (forged, modified, or from another "
                                   "repository)")
    return packs


def load(repo: Repository) -> tuple[dict[str, str], list[str], dict[str, str]]:
    """(pack → since: the union of every candidates object, the latest time winning; the objects listed;
    damaged object → why). A damaged object is left out: its packs then look like an interrupted run's leftovers,
    which is safe (a backup may adopt them, prune marks them again with a new time)."""
    found: dict[str, str] = {}
    names: list[str] = []
    damaged: dict[str, str] = {}
    for name, size in repo.backend.list("maintenance"):
        if not name.startswith(CANDIDATES):
            continue
        names.append(name)
        try:
            if size > MAX_OBJECT:
                raise IntegrityError(name, f"{size} bytes, more than a candidates object may hold")
            packs = decode(repo, name, repo.backend.read(name))
        except ObjectMissing:  # replaced by a prune between listing and reading
            continue
        except IntegrityError as e:
            damaged[name] = str(e)
            continue
        for pack, since in packs.items():
            found[pack] = max(since, found.get(pack, since))
    return found, names, damaged


def deletion_candidates(repo: Repository) -> dict[str, str]:
    """Pack → UTC time since it is a deletion candidate: backups must not adopt these packs, check reports them
    as such (a later prune deletes them once the grace period has passed, unless a snapshot references them)."""
    return load(repo)[0]
