"""Read-only commands (`snapshots`, `ls`, `stats`): straight to storage/, never importing Prefect.

They must start fast (target ≤ 0.5 s for `vaultflow snapshots`), so they print plain text.
"""

from __future__ import annotations

import json
import stat
import sys
from datetime import datetime
from typing import Any

from vaultflow.storage.repository import Repository
from vaultflow.storage.snapshot import SnapshotRecord
from vaultflow.tasks.fmt import human_bytes


def _columns(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows]]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def snapshots(repo: Repository, as_json: bool, source: str | None) -> int:
    records = sorted(repo.snapshots().items(), key=lambda item: (item[1].source, item[1].serial))
    if source:
        records = [(rid, r) for rid, r in records if r.source == source]
    if as_json:
        json.dump([{"id": rid, **r.body()} for rid, r in records], sys.stdout, indent=1)
        print()
        return 0
    rows = [[rid[:12], r.source, str(r.serial), r.finished[:19].replace("T", " "), r.host,
             str(r.stats.get("files", "")), human_bytes(float(r.stats.get("bytes", 0))), ", ".join(r.paths)]
            for rid, r in records]
    print(_columns(rows, ["id", "source", "serial", "finished (UTC)", "host", "files", "size", "paths"]))
    print(f"{len(rows)} snapshots")
    return 0


def ls(repo: Repository, spec: str, prefix: str | None, long: bool) -> int:
    rid, record = repo.find_snapshot(spec)
    files = repo.files_table(record)
    want = (prefix or "").strip("/")
    print(f"snapshot {rid[:12]} of {record.source} #{record.serial} at {record.finished}:", file=sys.stderr)
    for row in files.select(["path", "type", "size", "mode", "mtime_ns", "link_target", "status", "error"]) \
            .to_pylist():
        path = row["path"]
        if want and path != want and not path.startswith(want + "/"):
            continue
        if not long:
            print(path)
            continue
        mtime = datetime.fromtimestamp(row["mtime_ns"] / 1e9).strftime("%Y-%m-%d %H:%M:%S")
        target = f" -> {row['link_target'].decode(errors='backslashreplace')}" if row["link_target"] else ""
        note = f"  [{row['error']}]" if row["error"] else ""
        print(f"{stat.filemode(row['mode'])} {row['size']:>12} {mtime} {path}{target}{note}")
    return 0


def stats(repo: Repository, as_json: bool) -> int:
    records = repo.snapshots()
    packs = list(repo.backend.list("data"))
    index = repo.index
    latest: dict[str, SnapshotRecord] = {}
    for r in records.values():
        if r.source not in latest or r.serial > latest[r.source].serial:
            latest[r.source] = r
    out: dict[str, Any] = {
        "repository": repo.url, "id": repo.config.id, "snapshots": len(records), "sources": len(latest),
        "packs": len(packs), "stored_bytes": sum(size for _, size in packs), "chunks": len(index),
        "index_files": len(list(repo.backend.list("index"))),
        "latest_logical_bytes": sum(int(r.stats.get("bytes", 0)) for r in latest.values()),
    }
    if as_json:
        print(json.dumps(out, indent=1))
        return 0
    for key, value in out.items():
        shown = human_bytes(value) if key.endswith("bytes") else value
        print(f"{key.replace('_', ' '):>22}: {shown}")
    return 0
