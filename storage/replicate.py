"""Replicas: the same repository at another fsspec location, sharing its master key, so packs, index files,
manifests and records are copied byte for byte (what is missing, by name) and verified on both ends.

A replica has its own `config` (own id, the source's settings) and a MAC'd `replica` marker naming its source.
Records are committed last, per source in serial order, each only once every chunk it needs is on the replica.
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from typing import Any

import blake3
import pyarrow.compute as pc

from . import manifest
from .backend import Backend
from .crypto import content_hash, keyed_hash
from .errors import IntegrityError, NotARepository, ObjectExists, ObjectMissing, VaultflowError
from .index import Index, decode_index_file
from .keys import key_info
from .repository import CONFIG, RepoConfig, Repository
from .snapshot import SnapshotRecord, decode_record, forgotten, utc_now

MARKER = "replica"
MARKER_VERSION = 1
_MAX_MARKER = 4096
_LISTED = ("keys", "data", "index", "manifests", "tables")


class ReplicaError(VaultflowError):
    """A destination that is not, and cannot become, a replica of this repository."""


class Withheld(VaultflowError):
    """An index file naming a pack the replica lacks: copied, it would make the replica report lost data."""


@dataclass(frozen=True)
class Item:
    """An object to copy, its size on the source and the BLAKE3 hex it must hash to (key files: the 32-hex
    prefix that names them; manifests: the hash their record holds)."""

    name: str
    size: int
    digest: str


def _canonical(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def marker_key(repo: Repository) -> bytes:
    return repo.master.subkey("replica marker mac")


def encode_marker(key: bytes, of: str, created: str, source_config: str) -> bytes:
    """The `replica` object: which repository this replicates, and that one's `config`, verbatim (so a source
    that lost its config can have it back byte for byte, keeping its id)."""
    body = {"of": of, "created": created, "source_config": source_config, "version": MARKER_VERSION}
    return _canonical({"vaultflow_replica": body, "mac": keyed_hash(key, _canonical(body)).hex()}) + b"\n"


def read_marker(backend: Backend, key: bytes) -> str | None:
    """The id of the repository this one replicates, from its authenticated `replica` marker; None without one."""
    try:
        data = backend.read(MARKER) if backend.size(MARKER) <= _MAX_MARKER else b""
        body = json.loads(data)["vaultflow_replica"]
        if isinstance(body["of"], str) and encode_marker(key, body["of"], str(body["created"]),
                                                         str(body["source_config"])) == data:
            return body["of"]
    except ObjectMissing:
        return None
    except (ValueError, KeyError, TypeError, RecursionError):
        pass
    raise IntegrityError(MARKER, "replica marker does not authenticate (modified, or written with another key)",
                         "delete `replica` from the replica and run `vaultflow replicate` again to rewrite it")


def open_replica(source: Repository, backend: Backend, *, create: bool = True) -> tuple[Repository, bool]:
    """(the replica at `backend`, opened with the source's master key: no password, no KDF; whether it was
    created now). A location without a repository becomes one; the source itself and any repository with
    another master key are refused."""
    try:
        data = backend.read(CONFIG)
    except ObjectMissing:
        if not create:
            raise NotARepository(f"{backend.url}: no replica here yet; create it with `vaultflow replicate "
                                 f"{backend.url}`") from None
        return _create(source, backend), True
    try:
        config = RepoConfig.decode(data, source.master.config_key)
    except IntegrityError:
        raise ReplicaError(f"{backend.url} holds another vaultflow repository (its config does not authenticate with "
                           f"the key of {source.config.id}): a replica shares its source's master key; name a new "
                           "location or a replica of this repository") from None
    if config.id == source.config.id:
        raise ReplicaError(f"{backend.url} holds repository {config.id} itself (this location, or a plain copy of "
                           "it), not a replica; name another location")
    read_marker(backend, marker_key(source))  # damage is refused before anything is copied
    if config.object_lock:  # as Repository.open: every object it writes carries the replica's retention
        backend.retention = (config.object_lock["mode"], int(config.object_lock["days"]))
    return Repository(backend, config, source.master, source.key_name), False


def _create(source: Repository, backend: Backend) -> Repository:
    """Key files first, then the marker, then `config` last (as `init`): a folder without it is no repository."""
    sync_keys(source, backend)
    key = marker_key(source)
    try:
        config_text = source.config.encode(source.master.config_key).decode()  # the exact bytes `open` verified
        backend.write(MARKER, encode_marker(key, source.config.id, utc_now(), config_text))
    except ObjectExists:  # a creation that stopped before `config`
        if read_marker(backend, key) != source.config.id:
            raise ReplicaError(f"{backend.url}: its `replica` marker names another repository") from None
    c = source.config
    config = RepoConfig(id=os.urandom(16).hex(), created=utc_now(), chunker=c.chunker, pack_size=c.pack_size,
                        compression_level=c.compression_level, private_manifests=c.private_manifests,
                        version=c.version)
    try:
        backend.write(CONFIG, config.encode(source.master.config_key))
    except ObjectExists:  # another replicate run created it at the same moment
        return open_replica(source, backend, create=False)[0]
    return Repository(backend, config, source.master, source.key_name)


def sync_keys(source: Repository, backend: Backend) -> tuple[int, list[str], list[tuple[str, str]]]:
    """Copy the key files the replica lacks, so every password of the source opens it. Returns (copied, key files
    only the replica has: passwords removed from the source still open it, source key files not copied: why)."""
    have = {name for name, _ in backend.list("keys")}
    theirs = dict(source.backend.list("keys"))
    copied, bad = 0, []
    for item in _missing(theirs, theirs, have):
        try:
            copied += bool(copy_object(source, backend, item))
        except (IntegrityError, ObjectMissing) as e:
            bad.append((item.name, str(e)))
    return copied, sorted(have - set(theirs)), bad


def copy_object(source: Repository, backend: Backend, item: Item, absent: Collection[str] = ()) -> int:
    """Copy one immutable object byte for byte and return its size: it must hash to `item.digest` on the source
    (else it is not copied) and hash the same once stored on the replica (read back). An index file that names a
    pack in `absent` (lost or damaged on the source, not on the replica) is withheld."""
    try:
        data = source.backend.read(item.name)
    except ObjectMissing:
        raise ObjectMissing(f"{item.name}: missing from the source {source.url} (lost?); not copied") from None
    found = content_hash(data)
    if len(item.digest) < 32 or not found.startswith(item.digest):
        raise IntegrityError(item.name, f"on the source it hashes to {found[:16]}…, not {item.digest[:16]}… "
                             "(modified or corrupted); not copied to the replica")
    if item.name.startswith("keys/"):
        key_info(source.master, data, item.name)  # a key file of this master key, or not copied
    if item.name.startswith("index/") and absent:
        named = sorted(set(decode_index_file(source.master.index_key, data, item.name)[0]) & set(absent))
        if named:
            raise Withheld(f"{item.name}: names pack {named[0]}, which the replica lacks (lost or damaged on the "
                           "source); not copied: run `vaultflow repair index` on the source, then replicate again")
    backend.write(item.name, data, content_named=True)
    verify_arrival(backend, item.name, found)
    return len(data)


def verify_arrival(backend: Backend, name: str, expected: str) -> None:
    """Read the object back from the replica, streamed in 1 MiB blocks: it must hash to what was sent."""
    path = backend.path(name)
    if not backend.is_local:
        backend.fs.invalidate_cache(path)
    digest = blake3.blake3()
    with backend.fs.open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != expected:
        raise IntegrityError(f"{name} on the replica {backend.url}", f"hashes to {digest.hexdigest()[:16]}… after "
                             f"the copy, not {expected[:16]}…", "delete it there and run `vaultflow replicate` again")


Records = dict[str, SnapshotRecord]


def read_records(backend: Backend, record_key: bytes,
                 skip: Collection[str] = ()) -> tuple[Records, dict[str, int], dict[str, str]]:
    """(every authenticated record but those in `skip`, tombstones too; sizes by id; damaged ones with why)."""
    records: Records = {}
    sizes, damaged = dict(backend.list("snapshots")), {}
    for name in [n for n in sizes if n.rsplit("/", 1)[-1] not in skip]:
        rid = name.rsplit("/", 1)[-1]
        try:
            records[rid] = decode_record(record_key, backend.read(name), name, rid)
        except ObjectMissing:
            continue
        except IntegrityError as e:
            damaged[name] = str(e)
    return records, {rid: sizes[f"snapshots/{rid}"] for rid in records}, damaged


@dataclass
class Plan:
    """What the replica lacks, in copy order: packs, index files, manifests, then records (chain order)."""

    keys: list[Item] = field(default_factory=list)
    packs: list[Item] = field(default_factory=list)
    index_files: list[Item] = field(default_factory=list)
    manifests: list[Item] = field(default_factory=list)
    records: list[Item] = field(default_factory=list)
    damaged: dict[str, str] = field(default_factory=dict)  # source objects that failed verification
    lost_packs: list[str] = field(default_factory=list)  # indexed on the source, gone from its storage
    lost_kept: list[str] = field(default_factory=list)  # of those, the ones the replica still has
    heads: dict[str, tuple[int, int]] = field(default_factory=dict)  # source -> (its serial, the replica's)

    def objects(self) -> list[Item]:
        return [*self.keys, *self.packs, *self.index_files, *self.manifests, *self.records]


def plan(source: Repository, backend: Backend, selected: list[str] | None = None) -> Plan:
    """What the replica at `backend` lacks. Each side is listed records first, data last, so everything a listed
    record names is listed too. Packs are those the source's index files list (not a crashed run's leftovers nor
    prune's candidates); `selected` (snapshot specs) limits it to each one's source up to it, chain and data."""
    theirs, _, _ = read_records(backend, source.master.record_key)
    mine, sizes, damaged = read_records(source.backend, source.master.record_key, skip=theirs)
    # a record the replica holds has the very bytes its name hashes to: it is not read from the source again
    listed = {name.rsplit("/", 1)[-1] for name, _ in source.backend.list("snapshots")}
    mine.update({rid: r for rid, r in theirs.items() if rid in listed})
    src = {p: dict(source.backend.list(p)) for p in _LISTED}
    have = {name for p in _LISTED for name, _ in backend.list(p)}
    gone = forgotten(mine)
    bounds: dict[str, int] | None = None
    for spec in selected or []:  # each spec's source up to it: the chain is replicated without a gap
        _, picked = source.find_snapshot(spec)
        bounds = {**(bounds or {}), picked.source: max((bounds or {}).get(picked.source, 0), picked.serial)}
    wanted = {rid: r for rid, r in mine.items()
              if rid not in gone and (bounds is None or r.serial <= bounds.get(r.source, 0))}
    out = Plan(damaged=damaged, keys=_missing(src["keys"], src["keys"], have))
    for rid in sorted(wanted, key=lambda i: (wanted[i].source, wanted[i].serial, i)):
        if rid not in theirs:
            out.records.append(Item(f"snapshots/{rid}", sizes[rid], rid))
            out.manifests += [Item(obj, src["manifests"].get(obj, src["tables"].get(obj, 0)), digest)
                              for obj, digest in sorted(wanted[rid].manifests.items()) if obj not in have]
    for name in sorted({r.source for r in wanted.values()}):
        out.heads[name] = (max(r.serial for r in mine.values() if r.source == name),
                           max((r.serial for r in theirs.values() if r.source == name), default=0))
    by_file, index = _index_files(source, list(src["index"]), out.damaged, bounds is not None)
    indexed = {p for packs in by_file.values() for p in packs}
    out.lost_packs = sorted(indexed - set(src["data"]))
    out.lost_kept = [p for p in out.lost_packs if p in have]
    files, packs = set(by_file), indexed
    if index is not None:  # the packs the selected snapshots need, and whole index files around them
        needed = _packs_of(source, index, [wanted[i.digest] for i in out.records])
        files = {f for f, ps in by_file.items() if needed & set(ps)}
        packs = {p for f in files for p in by_file[f]}
    out.index_files = _missing(sorted(files), src["index"], have)
    out.packs = _missing(sorted(packs), src["data"], have)
    return out


def _missing(names: Iterable[str], sizes: dict[str, int], have: set[str]) -> list[Item]:
    """Items for the content-named objects among `names` that the source stores and the replica lacks."""
    return [Item(n, sizes[n], n.rsplit("/", 1)[-1]) for n in names if n in sizes and n not in have]


def _index_files(source: Repository, names: list[str], damaged: dict[str, str],
                 want_index: bool) -> tuple[dict[str, list[str]], Index | None]:
    """The packs each readable index file lists (a damaged one goes to `damaged`), and the index they form."""
    by_file: dict[str, list[str]] = {}
    index = Index() if want_index else None
    for name in names:
        try:
            columns = source.read_index_file(name)
        except ObjectMissing:
            continue
        except IntegrityError as e:
            damaged[name] = str(e)
            continue
        by_file[name] = list(columns[0])
        if index is not None:
            index.add_columns(*columns)
    return by_file, index


def _packs_of(source: Repository, index: Index, records: list[SnapshotRecord]) -> set[str]:
    """The packs holding every chunk the files tables of `records` reference (read from the source)."""
    hits = [index.lookup(cid) for r in records for name, digest in r.manifests.items()
            if name.startswith("manifests/") for cid in _chunk_ids(source, name, digest)]
    return {hit[0] for hit in hits if hit is not None}


def _chunk_ids(repo: Repository, name: str, digest: str) -> list[bytes]:
    data = repo.read_object(name, digest)
    if name.endswith(".enc"):
        data = manifest.open_manifest(repo.master.manifest_key, data, name)
    ids: list[bytes] = pc.list_flatten(manifest.from_parquet(data, manifest.FILES_SCHEMA, name)["chunks"]) \
        .unique().to_pylist()
    return ids


@dataclass
class Committed:
    records: list[str] = field(default_factory=list)  # ids committed, in order
    held: list[tuple[str, str]] = field(default_factory=list)  # (record, why): not committed, nor its successors
    warnings: list[str] = field(default_factory=list)


def commit_records(source: Repository, replica: Repository, records: list[Item]) -> Committed:
    """Write the records to the replica in the order given (per source by serial), each only when its manifests
    are there and every chunk they reference is indexed in a pack the replica has; the first of a source that
    is not ready (or that forks the replica's own history) holds back that source's later records."""
    index = replica.build_index()
    index.drop_packs(index.pack_set() - {name for name, _ in replica.backend.list("data")})
    theirs, _, _ = read_records(replica.backend, replica.master.record_key)
    taken = {(r.source, r.serial): rid for rid, r in theirs.items()}
    out = Committed()
    blocked: set[str] = set()
    for item in records:
        try:
            data = source.backend.read(item.name)
            record = decode_record(source.master.record_key, data, item.name, item.digest)  # verified as sent
        except ObjectMissing:  # deleted since the plan (by a forget, whose tombstone the next run copies)
            out.warnings.append(f"{item.name} was deleted from the source during the replication; not copied")
            continue
        except IntegrityError as e:
            out.held.append((item.name, str(e)))
            continue
        why = "" if record.source not in blocked else "an earlier record of its source was not committed"
        why = why or _not_ready(replica, index, record, item.digest,
                                taken.get((record.source, record.serial), item.digest))
        if why:
            out.held.append((item.name, f"{record.source}#{record.serial}: {why}"))
            blocked.add(record.source)
            continue
        replica.backend.write(item.name, data, content_named=True)
        verify_arrival(replica.backend, item.name, item.digest)
        out.records.append(item.digest)
        taken[(record.source, record.serial)] = item.digest
    return out


def _not_ready(replica: Repository, index: Index, record: SnapshotRecord, rid: str, occupant: str) -> str:
    """Why `record` cannot be committed to the replica yet ('' when it can)."""
    if occupant != rid:
        return (f"the replica already has another record of this serial ({occupant[:12]}): its history diverged "
                "(a backup into the replica, or a rollback of the source); compare `vaultflow snapshots` of both")
    try:
        for name, digest in record.manifests.items():
            if not name.startswith("manifests/"):
                replica.read_object(name, digest)
        chunks = [c for name, digest in record.manifests.items() if name.startswith("manifests/")
                  for c in _chunk_ids(replica, name, digest)]
    except (IntegrityError, ObjectMissing) as e:
        return f"its manifest is not on the replica intact ({e})"
    missing = [c for c, ok in zip(chunks, index.contains_many(chunks), strict=True) if not ok]
    if missing:
        return (f"{len(missing)} chunks it needs are in no pack the replica has (first: {missing[0].hex()[:16]}…); "
                "run `vaultflow check` on the source: a lost or damaged pack or index file")
    return ""
