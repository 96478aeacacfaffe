"""The repository façade that tasks/ calls: create and open, keys, blobs, objects, snapshots, locks.

Write order is packs → index → manifest → snapshot record; the record is the commit point.
"""

from __future__ import annotations

import hmac
import json
import os
import threading
from dataclasses import asdict, dataclass, field
from typing import Any

from . import pack as packfmt
from .backend import Backend
from .chunker import Chunker, ChunkerParams
from .crypto import content_hash, keyed_hash
from .errors import IntegrityError, NotARepository, ObjectMissing, RepositoryExists, VaultflowError, WrongPassword
from .index import Index, decode_index_file
from .keys import MAX_KEY_FILE_SIZE, KdfParams, KeyInfo, MasterKey, key_info, unwrap_master_key, wrap_master_key
from .lock import STALE_AFTER, Lock
from .pack import BlobType, PackEntry, PackReader
from .snapshot import (
    DamagedRecord,
    SnapshotRecord,
    decode_record,
    encode_record,
    forgotten,
    peek_record,
    utc_now,
)
from .upload import WriteSession, trailers

REPOSITORY_VERSION = 1
CONFIG = "config"


# zstd level of new repositories. Level 1 rather than 3: measured on this project's bench data, level 1 compressed
# 1 MiB text chunks 1.6x faster (202 vs 125 MB/s) to the same size (0.376 vs 0.384 of the input), and small
# files' blobs 1.7x faster; compression was half of a first backup's CPU time. `init --compression-level`.
DEFAULT_COMPRESSION_LEVEL = 1


@dataclass(frozen=True)
class RepoConfig:
    """Repository-wide settings, fixed at `init`, MAC'd with a key derived from the master key."""

    id: str
    created: str
    chunker: ChunkerParams = field(default_factory=ChunkerParams)
    pack_size: int = 16 << 20
    compression_level: int = 3
    private_manifests: bool = False
    version: int = REPOSITORY_VERSION
    # S3 Object Lock: {"mode": "GOVERNANCE"|"COMPLIANCE", "days": N}; every immutable object is written with a
    # retention that long (docs/format.md §14). Omitted from the encoding when unset, so older configs keep
    # their exact bytes.
    object_lock: dict[str, Any] | None = None

    def fields(self) -> dict[str, Any]:
        body = asdict(self)
        if body["object_lock"] is None:
            del body["object_lock"]
        return body

    def encode(self, config_key: bytes) -> bytes:
        body = _canonical(self.fields())
        return _canonical({"vaultflow_repository": self.fields(), "mac": keyed_hash(config_key, body).hex()}) + b"\n"

    @staticmethod
    def peek(data: bytes) -> dict[str, Any]:
        """The config's fields before they can be authenticated (no key is open yet)."""
        return RepoConfig._outer(data)[0]

    @staticmethod
    def _outer(data: bytes) -> tuple[dict[str, Any], Any]:
        try:
            outer = json.loads(data)
            body = outer["vaultflow_repository"]
            if not isinstance(body, dict):
                raise TypeError
            return body, outer.get("mac")
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
            raise _config_damage("repository config is not valid JSON (corrupted)") from None

    @staticmethod
    def decode(data: bytes, config_key: bytes) -> RepoConfig:
        """Authenticate and parse; the bytes must be exactly what `encode` writes (MAC hex case included)."""
        body, mac = RepoConfig._outer(data)
        try:
            expected = keyed_hash(config_key, _canonical(body)).hex()
        except RecursionError:  # JSON nested deeper than re-encoding allows is not a config vaultflow wrote
            raise _config_damage("repository config is nested too deeply (corrupted)") from None
        # Compare the lowercase hex text, not bytes.fromhex(mac): that accepts either case and raises on non-hex.
        if not isinstance(mac, str) or not mac.isascii() or not hmac.compare_digest(mac, expected):
            raise _config_damage("repository config MAC mismatch (modified or corrupted)")
        if body.get("version") != REPOSITORY_VERSION:
            raise NotARepository(f"repository version {body.get('version')} is not {REPOSITORY_VERSION}")
        try:
            config = RepoConfig(**{**body, "chunker": ChunkerParams(**body["chunker"])})
        except (TypeError, KeyError) as e:
            raise _config_damage(f"repository config has unexpected fields ({e})") from None
        if config.encode(config_key) != data:
            raise _config_damage("repository config is not byte-for-byte what vaultflow wrote (modified)")
        return config


def _config_damage(problem: str) -> IntegrityError:
    # `vaultflow check` cannot help here: it must open the config first.
    return IntegrityError(CONFIG, problem, "no repository opens without it: put back `config` from a copy of "
                                           "this repository (a backup of the folder, or the `source_config` "
                                           "field of a replica's `replica` object: docs/format.md §16); packs, "
                                           "indexes and snapshots are not affected")


def _canonical(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _is_full_id(spec: str) -> bool:
    return len(spec) == 64 and all(c in "0123456789abcdef" for c in spec.lower())


class Repository:
    """An open repository: the backend, the master key and config, and the index loaded on first use."""

    def __init__(self, backend: Backend, config: RepoConfig, master: MasterKey, key_name: str) -> None:
        self.backend = backend
        self.config = config
        self.master = master
        self.key_name = key_name
        self._index: Index | None = None
        self.damaged_index_files: dict[str, str] = {}  # name -> why, from the last index load
        self.recovered_packs: dict[str, list[PackEntry]] = {}  # packs of damaged index files, from their trailers
        self.damaged_records: dict[str, DamagedRecord] = {}  # id -> what failed, from the last snapshots()
        self.chain_records: dict[str, SnapshotRecord] = {}  # every good record, tombstones too, likewise
        self._candidates_read = False  # find_blob looked in prune's deletion candidates
        self._index_lock = threading.Lock()
        self._local = threading.local()

    @property
    def url(self) -> str:
        return self.backend.url

    # -- creating and opening ------------------------------------------------------------------------------

    @classmethod
    def init(cls, url: str, password: str, *, storage_options: dict[str, Any] | None = None,
             kdf: KdfParams | None = None, chunker: ChunkerParams | None = None, pack_size: int = 16 << 20,
             private_manifests: bool = False, compression_level: int = DEFAULT_COMPRESSION_LEVEL,
             object_lock: tuple[str, int] | None = None) -> Repository:
        """Create a repository; the config is written last, so a half-created one is not mistaken for one.
        `object_lock` (mode, days): S3 Object Lock retention on every immutable object (the bucket must have
        Object Lock enabled)."""
        backend = Backend(url, storage_options)
        lock_setting = None
        if object_lock is not None:
            mode, days = object_lock[0].upper(), int(object_lock[1])
            if mode not in ("GOVERNANCE", "COMPLIANCE") or not 1 <= days <= 36500:
                raise ValueError("object lock: mode GOVERNANCE or COMPLIANCE, and 1 to 36500 days")
            backend.require_object_lock()
            lock_setting = {"mode": mode, "days": days}
            backend.retention = (mode, days)
        if backend.exists(CONFIG):
            raise RepositoryExists(f"{url} already holds a vaultflow repository; open it, or choose another location")
        if not 1 << 20 <= pack_size <= 1 << 30:
            raise ValueError("pack_size must be between 1 MiB and 1 GiB")
        if not -7 <= compression_level <= 19:
            raise ValueError("compression_level must be a zstd level between -7 and 19")
        master = MasterKey.generate()
        config = RepoConfig(id=os.urandom(16).hex(), created=utc_now(), chunker=chunker or ChunkerParams(),
                            pack_size=pack_size, compression_level=compression_level,
                            private_manifests=private_manifests, object_lock=lock_setting)
        key_name = cls._write_key(backend, master, password, kdf)  # refuses out-of-range KDF parameters
        backend.write(CONFIG, config.encode(master.config_key))
        return cls(backend, config, master, key_name)

    @staticmethod
    def _write_key(backend: Backend, master: MasterKey, password: str, kdf: KdfParams | None) -> str:
        data = wrap_master_key(master, password, kdf)
        name = f"keys/{content_hash(data)[:32]}"
        backend.write(name, data, content_named=True)
        return name

    @staticmethod
    def _read_key(backend: Backend, name: str, size: int) -> bytes:
        if size > MAX_KEY_FILE_SIZE:  # not read at all: a huge object in keys/ must not exhaust memory
            raise IntegrityError(name, f"key file is {size} bytes, more than a key file's {MAX_KEY_FILE_SIZE}")
        return backend.read(name)

    @classmethod
    def open(cls, url: str, password: str, *, storage_options: dict[str, Any] | None = None) -> Repository:
        """Open with any key file that `password` unlocks; a wrong password raises WrongPassword."""
        backend = Backend(url, storage_options)
        try:
            config_data = backend.read(CONFIG)
        except ObjectMissing:
            raise NotARepository(f"{url}: no vaultflow repository here (no config); create one with `vaultflow init`") \
                from None
        RepoConfig.peek(config_data)
        damaged: list[str] = []
        reasons: list[str] = []
        listing = list(backend.list("keys"))
        for name, size in listing:
            # One damaged or hostile key file is skipped, whatever is wrong with it: it never blocks the others.
            try:
                master = unwrap_master_key(cls._read_key(backend, name, size), password, name)
            except WrongPassword:
                continue
            except (IntegrityError, ObjectMissing, OSError) as e:
                damaged.append(name)
                reasons.append(e.problem if isinstance(e, IntegrityError) else str(e))
                continue
            config = RepoConfig.decode(config_data, master.config_key)
            if config.object_lock:
                backend.retention = (config.object_lock["mode"], int(config.object_lock["days"]))
            return cls(backend, config, master, name)
        if damaged and len(damaged) == len(listing):
            raise IntegrityError(", ".join(damaged), f"every key file is damaged ({'; '.join(reasons)})",
                                 "restore an intact key file from a copy of keys/")
        skipped = f" ({len(damaged)} damaged key files skipped: {', '.join(damaged)})" if damaged else ""
        raise WrongPassword(f"wrong password: none of the {len(listing)} key files in {url} opens with it{skipped}")

    # -- keys ----------------------------------------------------------------------------------------------

    def add_key(self, password: str, kdf: KdfParams | None = None) -> str:
        return self._write_key(self.backend, self.master, password, kdf)

    def list_keys(self) -> list[str]:
        return [name for name, _ in self.backend.list("keys")]

    def describe_keys(self) -> list[KeyInfo]:
        """Every key file with its created time, host and user, or why it is damaged (no passwords needed)."""
        out = []
        for name, size in self.backend.list("keys"):
            try:
                out.append(key_info(self.master, self._read_key(self.backend, name, size), name))
            except (IntegrityError, ObjectMissing, OSError) as e:
                out.append(KeyInfo(name, problem=str(e)))
        return out

    def resolve_key(self, spec: str) -> str:
        """`keys/<id>`, a bare id, or a unique prefix of one, to a key file name."""
        wanted = spec.strip().lower().removeprefix("keys/")
        keys = self.list_keys()
        hits = [k for k in keys if k == f"keys/{wanted}"] or [k for k in keys if wanted and k[5:].startswith(wanted)]
        if len(hits) != 1:
            problem = "matches no key file" if not hits else f"is ambiguous ({len(hits)} key files match)"
            raise VaultflowError(f"key {spec!r} {problem} in {self.url}; see `vaultflow key list`")
        return hits[0]

    def remove_key(self, spec: str) -> str:
        """Remove one key file; refused when no other key file that opens this repository would remain."""
        name = self.resolve_key(spec)
        if not any(k.problem is None and k.name != name for k in self.describe_keys()):
            raise VaultflowError(f"{name} is the only key file that opens this repository; add another password "
                                 "(`vaultflow key add`) before removing it")
        self.backend.delete(name)
        return name

    def change_password(self, new_password: str, kdf: KdfParams | None = None) -> str:
        """Add a key file for the new password, then remove the one this session opened with."""
        new = self.add_key(new_password, kdf)
        unwrap_master_key(self.backend.read(new), new_password, new)  # readable before the old one goes
        self.backend.delete(self.key_name)
        self.key_name = new
        return new

    # -- chunks and blobs ----------------------------------------------------------------------------------

    def chunker(self) -> Chunker:
        """This thread's chunker, seeded with the repository's secret gear table."""
        c: Chunker | None = getattr(self._local, "chunker", None)
        if c is None:
            c = self._local.chunker = Chunker(self.config.chunker, self.master.chunker_seed)
        return c

    def chunk_id(self, data: bytes | memoryview) -> bytes:
        return keyed_hash(self.master.chunk_id_key, data)

    @property
    def index(self) -> Index:
        with self._index_lock:
            if self._index is None:
                self._index = self.build_index()
            return self._index

    def build_index(self) -> Index:
        """The union of the index files as storage holds them now. A damaged one behaves like a missing one: it
        is named in `damaged_index_files` and the packs it covered are indexed from their own trailers
        (`recovered_packs`), so one bad index file never stops a restore or a backup (check still reports it;
        the next backup's index file lists those packs again)."""
        index = Index()
        damaged: dict[str, str] = {}
        for name, _ in self.backend.list("index"):
            try:
                index.add_columns(*self.read_index_file(name))
            except ObjectMissing:  # removed by `repair index` between listing and reading
                continue
            except IntegrityError as e:
                damaged[name] = str(e)
        if damaged:  # prune's deletion candidates are in no index file on purpose: not something to recover
            from .maintenance import deletion_candidates

            skip = index.pack_set() | set(deletion_candidates(self))
        recovered = trailers(self, dict(self.backend.list("data")), skip) if damaged else {}
        for pack, entries in recovered.items():
            index.add(pack, entries)
        self.damaged_index_files, self.recovered_packs = damaged, recovered
        return index

    def read_index_file(self, name: str) -> tuple[Any, ...]:
        data = self.backend.read(name)
        if content_hash(data) != name.rsplit("/", 1)[-1]:
            raise IntegrityError(name, "index file does not hash to its name (modified, truncated or corrupted)",
                                 "run `vaultflow repair index` to rebuild the index from the packs")
        return decode_index_file(self.master.index_key, data, name)

    def forget_lost_packs(self, listed: set[str] | None = None) -> list[str]:
        """Drop from the loaded index every pack that storage no longer has (one listing of data/, or `listed`),
        so a lookup finds a surviving copy of a chunk or none, never a lost one; returns the lost packs."""
        present = listed if listed is not None else {name for name, _ in self.backend.list("data")}
        lost = sorted(self.index.pack_set() - present)
        if lost:
            self.index.drop_packs(set(lost))
        return lost

    def reload_index(self) -> None:
        with self._index_lock:
            self._index = None

    def use_index(self, index: Index) -> None:
        """Adopt an index just built from storage (`build_index`), e.g. after other processes added packs."""
        with self._index_lock:
            self._index = index

    def write_session(self) -> WriteSession:
        return WriteSession(self)

    def find_blob(self, blob_id: bytes) -> tuple[str, PackEntry] | None:
        """Where a blob is: the index, else (once per repository object) prune's deletion candidates, indexed from
        their trailers. A snapshot committed by a writer whose view of the index predates a prune can reference a
        chunk that now sits only in a candidate; the next prune indexes that pack again, and until then readers
        find it here (docs/format.md §15)."""
        found = self.index.lookup(blob_id)
        if found is not None or self._candidates_read:
            return found
        self._candidates_read = True
        from .maintenance import deletion_candidates

        candidates = set(deletion_candidates(self))
        if candidates:
            sizes = {name: size for name, size in self.backend.list("data") if name in candidates}
            for pack, entries in trailers(self, sizes, self.index.pack_set()).items():
                self.index.add(pack, entries)
        return self.index.lookup(blob_id)

    def load_blob(self, blob_id: bytes, *, verify: bool = True) -> bytes:
        """One blob's plaintext; with `verify`, a data chunk's keyed hash is checked against its id."""
        found = self.find_blob(blob_id)
        if found is None:
            raise ObjectMissing(f"blob {blob_id.hex()} is not in the index (missing chunk)")
        pack, entry = found
        try:
            header, sealed = self.backend.read_ranges(
                pack, [(0, packfmt.HEADER_SIZE), (entry.offset, entry.offset + entry.length)])
        except ObjectMissing:
            if pack not in self.forget_lost_packs():
                raise
            if self.index.lookup(blob_id) is None:
                raise ObjectMissing(f"blob {blob_id.hex()}: its pack {pack} is missing from {self.url} and no "
                                    "other pack holds it") from None
            return self.load_blob(blob_id, verify=verify)  # the copy a later backup stored
        data = PackReader(self.master.blob_key, header, pack).blob(sealed, entry)
        if verify:
            self.verify_chunk(data, entry, pack)
        return data

    def verify_chunk(self, data: bytes, entry: PackEntry, pack: str) -> None:
        if entry.type == BlobType.DATA and self.chunk_id(data) != entry.id:
            raise IntegrityError(pack, f"chunk {entry.id.hex()} decrypts to content with another id")

    def read_pack(self, name: str) -> tuple[PackReader, list[PackEntry], bytes]:
        """A whole pack, checked against its name, with its reader and trailer entries."""
        data = self.backend.read(name)
        if content_hash(data) != name.rsplit("/", 1)[-1]:
            raise IntegrityError(name, f"pack does not hash to its name ({len(data)} bytes; modified, truncated "
                                 "or corrupted)")
        reader, entries = packfmt.parse_pack(self.master.blob_key, data, name)
        return reader, entries, data

    # -- content-named objects (manifests) -----------------------------------------------------------------

    def write_object(self, name: str, data: bytes) -> str:
        """Store an immutable object whose name carries its content hash (see manifest.content_named) and return
        its BLAKE3, to be recorded in the snapshot record; a retry that finds it stored already succeeds."""
        self.backend.write(name, data, content_named=True)
        return content_hash(data)

    def read_object(self, name: str, expected_hash: str) -> bytes:
        data = self.backend.read(name)
        if content_hash(data) != expected_hash:
            raise IntegrityError(name, f"content hash {content_hash(data)[:16]}… does not match the snapshot "
                                 f"record's {expected_hash[:16]}… (tampered or corrupted)")
        return data

    # -- snapshots -----------------------------------------------------------------------------------------

    def commit(self, record: SnapshotRecord) -> str:
        """Write the snapshot record: the commit point. Everything it names must already be durable."""
        rid, data = encode_record(self.master.record_key, record, self.config.private_manifests)
        self.backend.write(f"snapshots/{rid}", data, content_named=True)
        return rid

    def snapshots(self, *, everything: bool = False) -> dict[str, SnapshotRecord]:
        """Every authenticated snapshot: not tombstones, nor the records a tombstone removed (a forget that
        stopped before deleting them). A damaged record never blocks the others: it is left out and kept, with
        what it claims to be, in `damaged_records` (by id) for callers to report. `everything`: every
        authenticated record, tombstones and forgotten ones included (the chain as check sees it). Either way
        `chain_records` holds them all afterwards (serials and chain links must count tombstones)."""
        out: dict[str, SnapshotRecord] = {}
        damaged: dict[str, DamagedRecord] = {}
        for name, _ in self.backend.list("snapshots"):
            rid = name.rsplit("/", 1)[-1]
            try:
                data = self.backend.read(name)
            except ObjectMissing:  # removed (by prune) between listing and reading: not damage
                continue
            try:
                out[rid] = decode_record(self.master.record_key, data, name, rid)
            except IntegrityError as e:
                damaged[rid] = DamagedRecord(name, e.problem, *peek_record(data))
        self.damaged_records = damaged
        self.chain_records = dict(out)
        if everything:
            return out
        gone = forgotten(out)
        return {rid: r for rid, r in out.items() if not r.is_tombstone and rid not in gone}

    def chain_head(self, source: str) -> tuple[str, SnapshotRecord] | None:
        """The newest record of `source`'s chain, a tombstone included (a new record links to it), as of the last
        snapshots() call."""
        mine = [(r.serial, rid, r) for rid, r in self.chain_records.items() if r.source == source]
        if not mine:
            return None
        _, rid, rec = max(mine)
        return rid, rec

    def snapshot(self, rid: str) -> SnapshotRecord:
        """One snapshot record by its full id, authenticated (IntegrityError naming it if damaged)."""
        name = f"snapshots/{rid}"
        return decode_record(self.master.record_key, self.backend.read(name), name, rid)

    def latest(self, source: str, records: dict[str, SnapshotRecord] | None = None) -> tuple[str, SnapshotRecord] \
            | None:
        """The record with the highest serial of `source` (serials order history, clocks do not)."""
        records = records if records is not None else self.snapshots()
        mine = [(rec.serial, rid, rec) for rid, rec in records.items() if rec.source == source]
        if not mine:
            return None
        _, rid, rec = max(mine)
        return rid, rec

    def next_serial(self, source: str, records: dict[str, SnapshotRecord] | None = None) -> int:
        """The serial a new snapshot of `source` takes: above every good record of it and above every damaged
        record that claims it, so a damaged head is reported by check but its serial is never reused.
        `records` from a snapshots() call just made saves listing them again."""
        records = records if records is not None else self.snapshots()
        serials = [rec.serial for rec in (*records.values(), *self.chain_records.values()) if rec.source == source]
        serials += [d.serial for d in self.damaged_records.values() if d.source == source and d.serial is not None]
        return 1 + max(serials, default=0)

    # -- locks ---------------------------------------------------------------------------------------------

    def lock(self, *, exclusive: bool = False, purpose: str = "backup", stale_after: float = STALE_AFTER,
             scope: str = "", run: str = "") -> Lock:
        """A lock to use as a context manager; `scope` serialises writers of one source; `run` names the
        orchestrator's run that holds it, so whoever finds it stale can say which run died."""
        return Lock(self.backend, exclusive, purpose, stale_after, scope, run)

    def find_snapshot(self, spec: str, records: dict[str, SnapshotRecord] | None = None) -> tuple[str, SnapshotRecord]:
        """Resolve `latest`, `SOURCE:latest`, `SOURCE:SERIAL` or a unique id prefix to one snapshot."""
        if records is None and _is_full_id(spec):  # one read: damage elsewhere is irrelevant to it
            try:
                return spec.lower(), self.snapshot(spec.lower())
            except ObjectMissing:
                raise VaultflowError(f"snapshot {spec!r} matches no snapshot; name one by id prefix, 'latest' or "
                                     "SOURCE:SERIAL (see `vaultflow snapshots`)") from None
        records = records if records is not None else self.snapshots()
        damaged = self.damaged_records.get(spec.lower())
        if damaged is not None and _is_full_id(spec) and spec.lower() not in records:
            raise IntegrityError(damaged.name, damaged.reason)
        source, _, which = spec.rpartition(":") if ":" in spec else ("", "", spec)
        if which == "latest":
            pool = {rid: r for rid, r in records.items() if not source or r.source == source}
            if not pool:
                raise VaultflowError(f"no snapshots{f' of source {source!r}' if source else ''} in {self.url}")
            if not source and len({r.source for r in pool.values()}) > 1:
                found = max(pool.items(), key=lambda item: (item[1].finished, item[1].serial))
            else:
                found = max(pool.items(), key=lambda item: item[1].serial)
            return found
        if source:
            hits = [(rid, r) for rid, r in records.items() if r.source == source and str(r.serial) == which]
        else:
            hits = [(rid, r) for rid, r in records.items() if rid.startswith(spec.lower())] if spec else []
        if len(hits) != 1:
            problem = "matches no snapshot" if not hits else f"is ambiguous ({len(hits)} snapshots match)"
            raise VaultflowError(f"snapshot {spec!r} {problem}; name one by id prefix, 'latest' or SOURCE:SERIAL "
                                 "(see `vaultflow snapshots`)")
        return hits[0]

    def databases_table(self, record: SnapshotRecord) -> Any:
        """The per-table row counts a database source recorded (a pyarrow Table), or None for other sources."""
        from . import manifest

        found = [(n, h) for n, h in record.manifests.items() if n.startswith("tables/databases/")]
        if not found:
            return None
        [(name, digest)] = found[:1]
        data = self.read_object(name, digest)
        if name.endswith(".enc"):
            data = manifest.open_manifest(self.master.manifest_key, data, name)
        return manifest.from_parquet(data, manifest.DATABASES_SCHEMA, name)

    def files_table(self, record: SnapshotRecord) -> Any:
        """The snapshot's files table (a pyarrow Table), checked against the hash in its record."""
        from . import manifest

        files = [(n, h) for n, h in record.manifests.items() if n.startswith("manifests/")]
        if len(files) != 1:
            raise IntegrityError(f"snapshot {record.source}:{record.serial}", f"record names {len(files)} files "
                                 "manifests, expected exactly one")
        [(name, digest)] = files
        data = self.read_object(name, digest)
        if name.endswith(".enc"):
            data = manifest.open_manifest(self.master.manifest_key, data, name)
        return manifest.from_parquet(data, manifest.FILES_SCHEMA, name)
