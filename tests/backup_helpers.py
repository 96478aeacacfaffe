"""Helpers for backup tests: building awkward trees and reading a snapshot's file contents back."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from vaultflow.storage.repository import Repository


def awkward_tree(root: Path) -> dict[bytes, bytes]:
    """A tree with every kind of entry a backup must handle; returns {relative path: content} of regular files."""
    files: dict[bytes, bytes] = {}

    def put(rel: bytes, data: bytes) -> None:
        full = os.fsencode(root) + b"/" + rel
        os.makedirs(os.path.dirname(full), exist_ok=True)
        with open(full, "wb") as f:
            f.write(data)
        files[rel] = data

    put(b"docs/readme.txt", b"hello vaultflow\n" * 1000)
    put(b"docs/empty.txt", b"")
    put(b"data/random.bin", os.urandom(3 << 20))
    put(b"data/big.bin", os.urandom(1 << 20) * 20)  # 20 MiB, repetitive at 1 MiB: dedups within itself
    put("unicodé/naïve.txt".encode(), b"utf-8 name")
    put(b"latin1-\xe9t\xe9.txt", b"not valid utf-8 in the name")
    os.makedirs(root / "empty-dir")
    os.symlink("../docs/readme.txt", root / "data" / "link-to-readme")
    os.symlink("/etc", root / "link-outside")  # must be stored as a link, never followed
    os.link(root / "docs" / "readme.txt", root / "docs" / "hardlink.txt")
    files[b"docs/hardlink.txt"] = files[b"docs/readme.txt"]
    os.mkfifo(root / "fifo")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(root / "socket"))
    sock.close()
    return files


def read_back(repo: Repository, spec: str = "latest") -> dict[bytes, bytes]:
    """Every regular file of a snapshot, reassembled from its chunks (verified by keyed hash)."""
    _, record = repo.find_snapshot(spec)
    table = repo.files_table(record)
    out = {}
    from vaultflow.storage.manifest import raw_paths

    for raw, kind, chunks in zip(raw_paths(table).to_pylist(), table["type"].to_pylist(),
                                 table["chunks"].to_pylist(), strict=True):
        if kind == "file" and chunks is not None:
            out[raw] = b"".join(repo.load_blob(c) for c in chunks)
    return out


def entries(repo: Repository, spec: str = "latest") -> dict[bytes, dict[str, object]]:
    """The files table of a snapshot as {raw path: row}."""
    _, record = repo.find_snapshot(spec)
    table = repo.files_table(record)
    from vaultflow.storage.manifest import raw_paths

    return dict(zip(raw_paths(table).to_pylist(), table.to_pylist(), strict=True))


def unreadable_report(src: str, repo_url: str) -> tuple[list[str], list[str | None]]:
    """(listing errors, read errors of 'secret' and 'fine') for the unreadable-files test."""
    from vaultflow.storage import archiver
    from vaultflow.tasks.sources.filesystem import scan

    _, errors, _ = scan(src)
    repo = Repository.open(repo_url, "pw")
    results, _ = archiver.archive_files(repo, repo.write_session(), src, [b"secret", b"fine"])
    return [f"{os.fsdecode(p)}: {m}" for p, m in errors], results["error"].to_pylist()


def as_unprivileged_user(fn, *args):  # type: ignore[no-untyped-def]
    """Call fn(*args) where file permissions apply: in a child process without root's DAC capabilities when
    running as root (root reads everything otherwise), else right here."""
    if os.geteuid() != 0:
        return fn(*args)
    import json
    import subprocess
    import sys

    script = ("import json, sys; sys.path.insert(0, sys.argv[1]); import backup_helpers as h; "
              f"print(json.dumps(h.{fn.__name__}(*json.loads(sys.argv[2]))))")
    drop = "-dac_override,-dac_read_search"
    out = subprocess.run(["setpriv", f"--inh-caps={drop}", f"--bounding-set={drop}", sys.executable, "-c", script,
                          str(Path(__file__).parent), json.dumps(args)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return tuple(json.loads(out.stdout))


def start_cli_backup(tmp_path: Path, api_url: str, big_files: int = 6):  # type: ignore[no-untyped-def]
    """A `vaultflow backup` process over a few hundred MB, returned once it holds its repository lock (so it is
    mid-run, ready to be killed or to lose its API): (repository, the process, its lock's LockInfo)."""
    import json
    import subprocess
    import sys
    import time

    from conftest import FAST_KDF

    from vaultflow.storage.lock import LockInfo

    repo_url = str(tmp_path / "repo")
    repo = Repository.init(repo_url, "pw", kdf=FAST_KDF)
    src = tmp_path / "src"
    src.mkdir()
    for i in range(big_files):
        (src / f"big{i}.bin").write_bytes(os.urandom(40 << 20))
    env = {**os.environ, "VAULTFLOW_REPOSITORY": repo_url, "VAULTFLOW_PASSWORD": "pw", "PREFECT_API_URL": api_url,
           "VAULTFLOW_HOME": str(tmp_path / "home")}
    child = subprocess.Popen([sys.executable, "-m", "vaultflow", "backup", str(src), "--source", "big"], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and child.poll() is None:
        for name, _ in repo.backend.list("locks"):
            return repo, child, LockInfo(**json.loads(repo.backend.read(name)))
        time.sleep(0.02)
    child.kill()
    raise AssertionError(f"the backup never held its lock (exit {child.poll()}): {child.communicate()[1][-2000:]}")
