"""Read-only commands (`snapshots`, `ls`, `stats`, `key list`): straight to storage/, never importing Prefect.

They must start fast (target ≤ 0.5 s for `vaultflow snapshots`), so they print plain text, with every control
character in names escaped (a file name must not drive the terminal); `--json` output stays exact.
"""

from __future__ import annotations

import json
import re
import stat
import sys
from datetime import datetime
from typing import Any

from vaultflow.storage.errors import VaultflowError
from vaultflow.storage.repository import Repository
from vaultflow.storage.snapshot import SnapshotRecord
from vaultflow.tasks.fmt import human_bytes

# C0, DEL, C1, the Unicode line/paragraph separators and the bidirectional overrides that reorder what is shown.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def safe(text: str) -> str:
    """`text` for a terminal: control characters become visible escapes (\\x1b, \\u202e)."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m[0]):02x}" if ord(m[0]) < 0x100 else f"\\u{ord(m[0]):04x}", text)


def _columns(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows]]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def snapshots(repo: Repository, as_json: bool, source: str | None) -> int:
    records = sorted(repo.snapshots().items(), key=lambda item: (item[1].source, item[1].serial))
    if source:
        records = [(rid, r) for rid, r in records if r.source == source]
    # A damaged record is skipped, never silently; the warning goes to stderr so --json stays exact.
    for damaged in sorted(repo.damaged_records.values(), key=lambda d: d.name):
        claims = f" (claims {safe(damaged.source or '?')} #{damaged.serial or '?'})" if damaged.source else ""
        print(f"warning: {damaged.name}{claims} is damaged and not listed: {safe(damaged.reason)}; run "
              "`vaultflow check`", file=sys.stderr)
    if as_json:
        json.dump([{"id": rid, **r.body()} for rid, r in records], sys.stdout, indent=1)
        print()
        return 0
    rows = [[rid[:12], safe(r.source), str(r.serial), safe(r.finished[:19].replace("T", " ")), safe(r.host),
             str(r.stats.get("files", "")), human_bytes(float(r.stats.get("bytes", 0))), safe(", ".join(r.paths))]
            for rid, r in records]
    print(_columns(rows, ["id", "source", "serial", "finished (UTC)", "host", "files", "size", "paths"]))
    print(f"{len(rows)} snapshots")
    return 0


def ls(repo: Repository, spec: str, prefix: str | None, long: bool) -> int:
    rid, record = repo.find_snapshot(spec)
    files = repo.files_table(record)
    want = (prefix or "").strip("/")
    print(f"snapshot {rid[:12]} of {safe(record.source)} #{record.serial} at {safe(record.finished)}:",
          file=sys.stderr)
    shown = 0
    for row in files.select(["path", "type", "size", "mode", "mtime_ns", "link_target", "status", "error"]) \
            .to_pylist():
        path = row["path"]
        if want and path != want and not path.startswith(want + "/"):
            continue
        shown += 1
        if not long:
            print(safe(path))
            continue
        mtime = datetime.fromtimestamp(row["mtime_ns"] / 1e9).strftime("%Y-%m-%d %H:%M:%S")
        target = f" -> {safe(row['link_target'].decode(errors='backslashreplace'))}" if row["link_target"] else ""
        note = f"  [{safe(row['error'])}]" if row["error"] else ""
        print(f"{stat.filemode(row['mode'])} {row['size']:>12} {mtime} {safe(path)}{target}{note}")
    if want and not shown:
        raise VaultflowError(f"{want}: not in snapshot {rid[:12]} ({record.source} #{record.serial}); "
                             f"`vaultflow ls {spec}` lists what it holds")
    return 0


def keys(repo: Repository) -> int:
    """One line per key file: * marks the one this password opened, ! a damaged one (and why)."""
    header = ["id", "created", "host", "user"]
    infos = repo.describe_keys()
    cells = {k.name: [k.id, safe(k.created), safe(k.host), safe(k.username)] for k in infos if k.problem is None}
    widths = [max(len(c[i]) for c in [header, *cells.values()]) for i in range(len(header))]

    def line(columns: list[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()

    print(f"  {line(header)}", file=sys.stderr)
    for k in infos:
        if k.problem is not None:
            print(f"! {k.id}  DAMAGED: {safe(k.problem)}")
        else:
            print(f"{'*' if k.name == repo.key_name else ' '} {line(cells[k.name])}")
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
