"""The repository façade that tasks/ calls: create and open, keys, blobs, objects, snapshots, locks.

Write order is packs → index → manifest → snapshot record; the record is the commit point.
"""

from __future__ import annotations

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
from .keys import KdfParams, MasterKey, unwrap_master_key, wrap_master_key
from .lock import STALE_AFTER, Lock
from .pack import BlobType, PackEntry, PackReader
from .snapshot import SnapshotRecord, decode_record, encode_record, utc_now
from .upload import WriteSession

REPOSITORY_VERSION = 1
CONFIG = "config"


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

    def encode(self, config_key: bytes) -> bytes:
        body = _canonical(asdict(self))
        return _canonical({"vaultflow_repository": asdict(self), "mac": keyed_hash(config_key, body).hex()}) + b"\n"

    @staticmethod
    def peek(data: bytes) -> dict[str, Any]:
        """The config's fields before they can be authenticated (no key is open yet)."""
        try:
            body = json.loads(data)["vaultflow_repository"]
            if not isinstance(body, dict):
                raise TypeError
            return body
        except (ValueError, KeyError, TypeError):
            raise IntegrityError(CONFIG, "repository config is not valid JSON (corrupted)") from None

    @staticmethod
    def decode(data: bytes, config_key: bytes) -> RepoConfig:
        body = RepoConfig.peek(data)
        mac = bytes.fromhex(json.loads(data).get("mac", ""))
        if keyed_hash(config_key, _canonical(body)) != mac:
            raise IntegrityError(CONFIG, "repository config MAC mismatch (modified or corrupted)")
        if body.get("version") != REPOSITORY_VERSION:
            raise NotARepository(f"repository version {body.get('version')} is not {REPOSITORY_VERSION}")
        return RepoConfig(**{**body, "chunker": ChunkerParams(**body["chunker"])})


def _canonical(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


class Repository:
    """An open repository: the backend, the master key and config, and the index loaded on first use."""

    def __init__(self, backend: Backend, config: RepoConfig, master: MasterKey, key_name: str) -> None:
        self.backend = backend
        self.config = config
        self.master = master
        self.key_name = key_name
        self._index: Index | None = None
        self._index_lock = threading.Lock()
        self._local = threading.local()

    @property
    def url(self) -> str:
        return self.backend.url

    # -- creating and opening ------------------------------------------------------------------------------

    @classmethod
    def init(cls, url: str, password: str, *, storage_options: dict[str, Any] | None = None,
             kdf: KdfParams | None = None, chunker: ChunkerParams | None = None, pack_size: int = 16 << 20,
             private_manifests: bool = False, compression_level: int = 3) -> Repository:
        """Create a repository; the config is written last, so a half-created one is not mistaken for one."""
        backend = Backend(url, storage_options)
        if backend.exists(CONFIG):
            raise RepositoryExists(f"{url} already holds a vaultflow repository; open it, or choose another location")
        if not 1 << 20 <= pack_size <= 1 << 30:
            raise ValueError("pack_size must be between 1 MiB and 1 GiB")
        if not -7 <= compression_level <= 19:
            raise ValueError("compression_level must be a zstd level between -7 and 19")
        master = MasterKey.generate()
        config = RepoConfig(id=os.urandom(16).hex(), created=utc_now(), chunker=chunker or ChunkerParams(),
                            pack_size=pack_size, compression_level=compression_level,
                            private_manifests=private_manifests)
        key_name = cls._write_key(backend, master, password, kdf)
        backend.write(CONFIG, config.encode(master.config_key))
        return cls(backend, config, master, key_name)

    @staticmethod
    def _write_key(backend: Backend, master: MasterKey, password: str, kdf: KdfParams | None) -> str:
        data = wrap_master_key(master, password, kdf)
        name = f"keys/{content_hash(data)[:32]}"
        backend.write(name, data, content_named=True)
        return name

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
        corrupt: list[IntegrityError] = []
        key_names = [name for name, _ in backend.list("keys")]
        for name in key_names:
            try:
                master = unwrap_master_key(backend.read(name), password, name)
            except WrongPassword:
                continue
            except IntegrityError as e:
                corrupt.append(e)
                continue
            return cls(backend, RepoConfig.decode(config_data, master.config_key), master, name)
        if corrupt and len(corrupt) == len(key_names):
            raise corrupt[0]
        damaged = f" ({len(corrupt)} damaged key files skipped: {corrupt[0]})" if corrupt else ""
        raise WrongPassword(f"wrong password: none of the {len(key_names)} key files in {url} opens with it{damaged}")

    # -- keys ----------------------------------------------------------------------------------------------

    def add_key(self, password: str, kdf: KdfParams | None = None) -> str:
        return self._write_key(self.backend, self.master, password, kdf)

    def list_keys(self) -> list[str]:
        return [name for name, _ in self.backend.list("keys")]

    def remove_key(self, name: str) -> None:
        keys = self.list_keys()
        if name not in keys:
            raise VaultflowError(f"{name}: no such key in {self.url}")
        if len(keys) == 1:
            raise VaultflowError(f"{name} is the only key; add another password before removing it")
        self.backend.delete(name)

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
                self._index = self._load_index()
            return self._index

    def _load_index(self) -> Index:
        index = Index()
        for name, _ in self.backend.list("index"):
            index.add_columns(*self.read_index_file(name))
        return index

    def read_index_file(self, name: str) -> tuple[Any, ...]:
        data = self.backend.read(name)
        if content_hash(data) != name.rsplit("/", 1)[-1]:
            raise IntegrityError(name, "index file does not hash to its name (modified, truncated or corrupted)",
                                 "run `vaultflow repair index` to rebuild the index from the packs")
        return decode_index_file(self.master.index_key, data, name)

    def reload_index(self) -> None:
        with self._index_lock:
            self._index = None

    def write_session(self) -> WriteSession:
        return WriteSession(self)

    def load_blob(self, blob_id: bytes, *, verify: bool = True) -> bytes:
        """One blob's plaintext; with `verify`, a data chunk's keyed hash is checked against its id."""
        found = self.index.lookup(blob_id)
        if found is None:
            raise ObjectMissing(f"blob {blob_id.hex()} is not in the index (missing chunk)")
        pack, entry = found
        header, sealed = self.backend.read_ranges(
            pack, [(0, packfmt.HEADER_SIZE), (entry.offset, entry.offset + entry.length)])
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
        """Store an immutable object and return its BLAKE3, to be recorded in the snapshot record."""
        self.backend.write(name, data, content_named=False)
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
        rid, data = encode_record(self.master.record_key, record)
        self.backend.write(f"snapshots/{rid}", data, content_named=True)
        return rid

    def snapshots(self) -> dict[str, SnapshotRecord]:
        """Every snapshot record, authenticated; a damaged one raises IntegrityError naming it."""
        out: dict[str, SnapshotRecord] = {}
        for name, _ in self.backend.list("snapshots"):
            rid = name.rsplit("/", 1)[-1]
            out[rid] = self.snapshot(rid)
        return out

    def snapshot(self, rid: str) -> SnapshotRecord:
        """One snapshot record by its full id, authenticated."""
        name = f"snapshots/{rid}"
        return decode_record(self.master.record_key, self.backend.read(name), name, rid)

    def latest(self, source: str, records: dict[str, SnapshotRecord] | None = None) -> tuple[str, SnapshotRecord] \
            | None:
        """The record with the highest serial of `source` (serials order history, clocks do not)."""
        mine = [(rec.serial, rid, rec) for rid, rec in (records or self.snapshots()).items() if rec.source == source]
        if not mine:
            return None
        _, rid, rec = max(mine)
        return rid, rec

    # -- locks ---------------------------------------------------------------------------------------------

    def lock(self, *, exclusive: bool = False, purpose: str = "backup", stale_after: float = STALE_AFTER,
             scope: str = "") -> Lock:
        """A lock to use as a context manager; `scope` serialises writers of one source."""
        return Lock(self.backend, exclusive, purpose, stale_after, scope)

    def find_snapshot(self, spec: str, records: dict[str, SnapshotRecord] | None = None) -> tuple[str, SnapshotRecord]:
        """Resolve `latest`, `SOURCE:latest`, `SOURCE:SERIAL` or a unique id prefix to one snapshot."""
        records = records if records is not None else self.snapshots()
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

    def files_table(self, record: SnapshotRecord) -> Any:
        """The snapshot's files table (a pyarrow Table), checked against the hash in its record."""
        from . import manifest

        [(name, digest)] = [(n, h) for n, h in record.manifests.items() if n.startswith("manifests/")]
        data = self.read_object(name, digest)
        if name.endswith(".enc"):
            data = manifest.open_manifest(self.master.manifest_key, data, name)
        return manifest.from_parquet(data, manifest.FILES_SCHEMA, name)
