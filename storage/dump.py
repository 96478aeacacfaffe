"""One entry of a snapshot as a byte stream (restic's `dump`): a database dump to load, a stream to stdout.

Every chunk is authenticated on the way out and the whole content is checked against the file's keyed hash,
so a consumer that reads to the end has proven the bytes; a mismatch raises before the last byte is written.
"""

from __future__ import annotations

from typing import Any, BinaryIO

import blake3
import pyarrow as pa
import pyarrow.compute as pc

from .errors import IntegrityError, VaultflowError
from .manifest import raw_paths
from .repository import Repository


def find_entry(table: pa.Table, name: str) -> dict[str, Any]:
    """The files-table row of the regular file `name` (its exact path), or a clear error listing what there is."""
    hits = table.filter(pc.equal(raw_paths(table), pa.scalar(name.encode(), pa.binary())))
    if hits.num_rows != 1 or hits["type"][0].as_py() != "file":
        files = table.filter(pc.equal(table["type"], "file"))["path"].to_pylist()
        shown = ", ".join(files[:10]) + (" …" if len(files) > 10 else "")
        raise VaultflowError(f"the snapshot has no file or stream named {name!r}; it has: {shown or 'none'}")
    row: dict[str, Any] = hits.to_pylist()[0]
    if row["chunks"] is None:
        raise VaultflowError(f"{name} could not be read when it was backed up ({row.get('error')}); "
                             "nothing of it is stored")
    return row


def write_entry(repo: Repository, row: dict[str, Any], out: BinaryIO) -> int:
    """Write the entry's content to `out`, chunk by verified chunk; returns the bytes written.

    Raises IntegrityError when the content does not hash to what the manifest recorded (the consumer must then
    discard what it received)."""
    h = blake3.blake3(key=repo.master.file_hash_key)
    written = 0
    for cid in row["chunks"]:
        data = repo.load_blob(cid, verify=True)
        h.update(data)
        out.write(data)
        written += len(data)
    if written != row["size"] or h.digest() != row["content_hash"]:
        raise IntegrityError(row["path"], f"restored content ({written} bytes) does not match the recorded hash "
                             f"of {row['size']} bytes; discard this output and run `vaultflow check --read-data`")
    return written
