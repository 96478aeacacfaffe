"""Parquet manifests: the files table of each snapshot (schema v1), and the snapshots and errors tables.

Hive-partitioned as `manifests/source=<s>/snapshot=<serial>/files.parquet`, sorted by path, so DuckDB, pyarrow
and polars read them without vaultflow.
"""

from __future__ import annotations

import io
import re
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .crypto import Sealer, content_hash, object_key
from .errors import IntegrityError, VaultflowError
from .snapshot import SnapshotRecord, parse_utc

SCHEMA_VERSION = 1
ID = pa.binary(32)

FILES_SCHEMA = pa.schema([
    pa.field("path", pa.string(), nullable=False),  # relative to the source root, '/'-separated
    pa.field("raw_path", pa.binary()),  # the exact bytes when the name is not valid UTF-8, else null
    pa.field("type", pa.string(), nullable=False),  # file, dir, symlink, fifo, socket, char, block
    pa.field("size", pa.int64(), nullable=False),
    pa.field("mode", pa.uint32(), nullable=False),
    pa.field("uid", pa.uint32(), nullable=False),
    pa.field("gid", pa.uint32(), nullable=False),
    pa.field("mtime_ns", pa.int64(), nullable=False),
    pa.field("ctime_ns", pa.int64(), nullable=False),
    pa.field("inode", pa.uint64(), nullable=False),
    pa.field("dev", pa.uint64(), nullable=False),
    pa.field("nlink", pa.uint32(), nullable=False),
    pa.field("link_target", pa.binary()),  # symlinks: the target bytes, never followed
    pa.field("content_hash", ID),  # keyed BLAKE3 of the whole content (files)
    pa.field("chunks", pa.list_(ID)),  # chunk ids in order (files)
    pa.field("status", pa.string(), nullable=False),  # new, changed, unchanged, error
    pa.field("error", pa.string()),
], metadata={"vaultflow.schema": "files", "vaultflow.schema_version": str(SCHEMA_VERSION)})

ERRORS_SCHEMA = pa.schema([
    pa.field("path", pa.string(), nullable=False),
    pa.field("raw_path", pa.binary()),
    pa.field("stage", pa.string(), nullable=False),  # discover, read
    pa.field("error", pa.string(), nullable=False),
], metadata={"vaultflow.schema": "errors", "vaultflow.schema_version": str(SCHEMA_VERSION)})

SNAPSHOTS_SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("source", pa.string(), nullable=False),
    pa.field("serial", pa.int64(), nullable=False),
    pa.field("host", pa.string(), nullable=False),
    pa.field("started", pa.timestamp("us", tz="UTC"), nullable=False),
    pa.field("finished", pa.timestamp("us", tz="UTC"), nullable=False),
    pa.field("parent", pa.string()),
    pa.field("files", pa.int64()),
    pa.field("files_new", pa.int64()),
    pa.field("files_changed", pa.int64()),
    pa.field("files_unchanged", pa.int64()),
    pa.field("errors", pa.int64()),
    pa.field("bytes", pa.int64()),  # logical size of the snapshot
    pa.field("bytes_read", pa.int64()),
    pa.field("bytes_added", pa.int64()),  # new data, before compression
    pa.field("bytes_stored", pa.int64()),  # new data as stored (compressed, encrypted)
    pa.field("vaultflow_version", pa.string()),
    pa.field("manifest", pa.string()),  # the files manifest this record committed (object name)
], metadata={"vaultflow.schema": "snapshots", "vaultflow.schema_version": str(SCHEMA_VERSION)})

# Per table of a database source, counted inside the same consistent snapshot as its dump (or from the dump's
# own bytes): a restore test restores the stream into a scratch database and compares. Listed in the record's
# manifests, so it is authenticated like the files table.
DATABASES_SCHEMA = pa.schema([
    pa.field("stream", pa.string()),  # the entry (dump) the table is in, as in the files table's path
    pa.field("table", pa.string()),  # schema-qualified where the database has schemas
    pa.field("rows", pa.int64()),
    pa.field("checksum", pa.string()),  # where the database offers a cheap one; else null
], metadata={"vaultflow.schema": "databases", "vaultflow.schema_version": str(SCHEMA_VERSION)})

_SOURCE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
ROW_GROUP = 65536


def check_source_name(name: str) -> str:
    """Source names become hive partition values and object names, so they are restricted."""
    if not _SOURCE_NAME.match(name):
        raise VaultflowError(f"invalid source name {name!r}: use letters, digits, '.', '_' and '-' (max 128), "
                             "starting with a letter or digit")
    return name


def files_name(source: str, serial: int, private: bool = False) -> str:
    return f"manifests/source={source}/snapshot={serial}/files.parquet" + (".enc" if private else "")


def content_named(base: str, data: bytes) -> str:
    """`base` with the first 128 bits of the BLAKE3 of `data` in the file name: `…/files.parquet` becomes
    `…/files-<32 hex>.parquet`. A run that never committed can leave a manifest behind, and a later run of the
    same serial writes its own beside it, so no object a committed record names is ever replaced."""
    folder, _, leaf = base.rpartition("/")
    stem, dot, ext = leaf.partition(".")
    return f"{folder}/{stem}-{content_hash(data)[:32]}{dot}{ext}"


def errors_name(source: str, serial: int) -> str:
    return f"tables/errors/source={source}/snapshot={serial}/errors.parquet"


def databases_name(source: str, serial: int, private: bool = False) -> str:
    return f"tables/databases/source={source}/snapshot={serial}/databases.parquet" + (".enc" if private else "")


def snapshots_name(source: str, serial: int) -> str:
    return f"tables/snapshots/source={source}/snapshot={serial}/snapshot.parquet"


def display_path(raw: bytes) -> tuple[str, bytes | None]:
    """(UTF-8 text for humans, the raw bytes when they are not valid UTF-8)."""
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError:
        return raw.decode("utf-8", "backslashreplace"), raw


def raw_paths(table: pa.Table) -> pa.ChunkedArray:
    """The exact path bytes of every row: raw_path where set, else path encoded as UTF-8."""
    return pc.if_else(pc.is_null(table["raw_path"]), pc.cast(table["path"], pa.binary()), table["raw_path"])


def to_parquet(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", row_group_size=ROW_GROUP, write_statistics=True)
    return buf.getvalue()


def from_parquet(data: bytes, schema: pa.Schema, obj: str) -> pa.Table:
    try:
        table = pq.read_table(io.BytesIO(data))
    except (pa.ArrowException, OSError) as e:
        raise IntegrityError(obj, f"manifest is not readable Parquet ({e})") from None
    if table.schema.metadata is None or table.schema.metadata.get(b"vaultflow.schema_version") != \
            str(SCHEMA_VERSION).encode():
        raise IntegrityError(obj, f"manifest schema version is not {SCHEMA_VERSION}")
    return table.select(schema.names).cast(schema)


def seal_manifest(manifest_key: bytes, salt: bytes, data: bytes, name: str) -> bytes:
    """Private manifests: salt || seal(data), the object name as associated data."""
    return salt + Sealer(object_key(manifest_key, salt)).seal(data, name.encode())


def open_manifest(manifest_key: bytes, data: bytes, name: str) -> bytes:
    salt = data[:32]
    return Sealer(object_key(manifest_key, salt)).open(memoryview(data)[32:], name.encode(), name)


def errors_table(files: pa.Table, listing_errors: list[tuple[bytes, str]]) -> pa.Table:
    """The errors table: files that could not be read completely, then paths the listing could not visit."""
    failed = files.filter(pc.equal(files["status"], "error"))
    rows = [{"path": p, "raw_path": r, "stage": "read", "error": e} for p, r, e in
            zip(failed["path"].to_pylist(), failed["raw_path"].to_pylist(), failed["error"].to_pylist(), strict=True)]
    rows += [{"path": display_path(raw)[0], "raw_path": display_path(raw)[1], "stage": "discover", "error": e}
             for raw, e in listing_errors]
    return table_from_rows(rows, ERRORS_SCHEMA)


def snapshot_row(rid: str, record: SnapshotRecord) -> pa.Table:
    """The one-row tables/snapshots table derived from an authenticated record: the backup writes it after its
    commit and `check` compares what storage holds with it."""
    row = {"id": rid, "source": record.source, "serial": record.serial, "host": record.host,
           "started": parse_utc(record.started), "finished": parse_utc(record.finished), "parent": record.parent,
           "vaultflow_version": record.vaultflow_version,
           "manifest": next((n for n in record.manifests if n.startswith("manifests/")), None),
           **{k: v for k, v in record.stats.items() if k in SNAPSHOTS_SCHEMA.names}}
    return table_from_rows([row], SNAPSHOTS_SCHEMA)


def table_from_rows(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=schema)
