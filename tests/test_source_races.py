"""A local tree changing under a backup: folders swapped for symlinks (or other folders) and files swapped for
other files between listing and reading, or during the walk, never make the backup store another inode's bytes."""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from conftest import FAST_KDF

from vaultflow.storage import archiver
from vaultflow.storage.repository import Repository
from vaultflow.tasks.sources.filesystem import scan

REPLACED = "changed while being read (replaced since it was listed); not stored"
SUB = b"sub-\xff"  # a folder whose name is not UTF-8: names stay bytes through the descriptors too


@pytest.fixture
def tree(tmp_path: Path) -> tuple[bytes, bytes, dict[bytes, bytes]]:
    """(source root, outside folder, {name: content} inside SUB). The outside folder holds files of the same
    names as SUB (its `secret` readable only by its owner, root here) plus one name SUB lacks."""
    root = os.fsencode(tmp_path / "src")
    outside = os.fsencode(tmp_path / "outside")
    os.makedirs(root + b"/" + SUB)
    os.makedirs(outside)
    inside = {b"secret": b"the user's own notes\n" * 50, b"plain": b"plain user data\n" * 40}
    for name, data in inside.items():
        Path(os.fsdecode(root + b"/" + SUB + b"/" + name)).write_bytes(data)
        fd = os.open(outside + b"/" + name, os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, b"ROOT ONLY " + name + b" " + os.urandom(16) * 40)
        os.close(fd)
    Path(os.fsdecode(outside + b"/only-outside")).write_bytes(b"never listed")
    Path(os.fsdecode(root + b"/top.txt")).write_bytes(b"top level file")
    return root, outside, inside


def outside_contents(outside: bytes) -> list[bytes]:
    return [Path(os.fsdecode(outside + b"/" + n)).read_bytes() for n in os.listdir(outside)]


def new_repo(tmp_path: Path) -> Repository:
    return Repository.init(str(tmp_path / "repo"), "pw", kdf=FAST_KDF)


def listed_files(root: bytes) -> pa.Table:
    table, errors, _ = scan(os.fsdecode(root))
    assert errors == []
    return table.filter(pc.equal(table["type"], "file"))


def archive(repo: Repository, session, root: bytes, files: pa.Table) -> pa.Table:  # type: ignore[no-untyped-def]
    """archive_files as process_batch calls it: the keys with the listing's (dev, inode) of each."""
    idents = list(zip(files["dev"].to_pylist(), files["inode"].to_pylist(), strict=True))
    results, stats = archiver.archive_files(repo, session, os.fsdecode(root), files["key"].to_pylist(),
                                            idents=idents)
    assert stats.files == files.num_rows
    return results


def stored(repo: Repository, session, contents: list[bytes]) -> list[bool]:  # type: ignore[no-untyped-def]
    """Whether each content's chunk is in the repository's index as written (small files are one chunk)."""
    session.flush()
    session.write_index()
    session.close()
    return Repository.open(repo.url, "pw").index.contains_many([repo.chunk_id(c) for c in contents])


def swap_for_symlink(root: bytes, outside: bytes) -> None:
    os.rename(root + b"/" + SUB, root + b"/" + SUB + b".moved")
    os.symlink(outside, root + b"/" + SUB)


def test_folder_swapped_for_symlink_after_listing_is_not_read_through(tree, tmp_path):
    root, outside, inside = tree
    files = listed_files(root)
    swap_for_symlink(root, outside)
    repo = new_repo(tmp_path)
    session = repo.write_session()
    rows = dict(zip(files["key"].to_pylist(), archive(repo, session, root, files).to_pylist(), strict=True))
    for name in inside:
        row = rows[SUB + b"/" + name]
        assert row["error"] == REPLACED
        assert row["chunks"] is None and row["content_hash"] is None and row["size"] == 0
    assert rows[b"top.txt"]["error"] is None and rows[b"top.txt"]["chunks"]
    assert stored(repo, session, [b"top level file", *outside_contents(outside)]) == [True, False, False, False]


def test_folder_swapped_for_another_folder_after_listing_is_not_read(tree, tmp_path):
    """Without a symlink anywhere: the same path now names another folder (a rename), so other inodes."""
    root, outside, _ = tree
    files = listed_files(root)
    os.rename(root + b"/" + SUB, root + b"/" + SUB + b".moved")
    shutil.copytree(outside, root + b"/" + SUB)
    repo = new_repo(tmp_path)
    session = repo.write_session()
    results = archive(repo, session, root, files)
    errors = dict(zip(files["key"].to_pylist(), results["error"].to_pylist(), strict=True))
    assert errors == {SUB + b"/plain": REPLACED, SUB + b"/secret": REPLACED, b"top.txt": None}
    assert stored(repo, session, outside_contents(outside)) == [False, False, False]


def test_file_swapped_for_another_file_after_listing_is_not_read(tree, tmp_path):
    root, outside, _ = tree
    files = listed_files(root)
    os.rename(outside + b"/secret", root + b"/" + SUB + b"/secret")  # same name, another inode
    repo = new_repo(tmp_path)
    session = repo.write_session()
    results = archive(repo, session, root, files)
    errors = dict(zip(files["key"].to_pylist(), results["error"].to_pylist(), strict=True))
    assert errors == {SUB + b"/plain": None, SUB + b"/secret": REPLACED, b"top.txt": None}
    secret = Path(os.fsdecode(root + b"/" + SUB + b"/secret")).read_bytes()
    assert stored(repo, session, [secret]) == [False]


def test_folder_swapped_for_symlink_during_the_walk_is_not_descended(tree, monkeypatch):
    """The swap lands after the root's listing saw SUB as a folder and before the walk opens SUB."""
    root, outside, _ = tree
    real_scandir = os.scandir
    calls = []

    def scandir_then_swap(path):  # type: ignore[no-untyped-def]
        calls.append(path)
        it = real_scandir(path)
        entries = list(it)  # the listing's own stat calls happen per entry, below, as they would in place
        it.close()
        if len(calls) == 1:
            class Listing(list):  # a context manager like the ScandirIterator it stands for
                def __enter__(self):  # type: ignore[no-untyped-def]
                    return self

                def __exit__(self, *exc):  # type: ignore[no-untyped-def]
                    return None

                def __iter__(self):  # type: ignore[no-untyped-def]
                    yield from list.__iter__(self)
                    swap_for_symlink(root, outside)  # the whole root listing (and each stat) is done
            return Listing(entries)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir_then_swap)
    table, errors, _ = scan(os.fsdecode(root))
    monkeypatch.undo()
    keys = table["key"].to_pylist()
    assert os.path.islink(root + b"/" + SUB)  # the swap happened during the scan
    assert keys == [SUB, b"top.txt"]  # listed as the folder its parent saw, never the target's entries
    assert table.filter(pc.equal(table["key"], SUB))["type"].to_pylist() == ["dir"]
    assert [p for p, _ in errors] == [SUB] and "replaced" in errors[0][1]


def test_racing_symlink_swaps_never_store_or_list_the_outside_folder(tree, tmp_path):
    """A thread keeps swapping SUB between the real folder and a symlink to the outside folder (rename dance)
    while scan and archive_files run: each run lists or reads the real folder, or reports the path; the
    outside folder's names are never listed and its bytes never stored."""
    root, outside, inside = tree
    files = listed_files(root)  # listed before the race: the archiver then races on every read
    real, link, moved = root + b"/" + SUB, root + b"/" + SUB + b".link", root + b"/" + SUB + b".real"
    os.symlink(outside, link)
    repo = new_repo(tmp_path)
    session = repo.write_session()
    stop, swaps = threading.Event(), [0]

    def dance() -> None:
        while not stop.is_set():
            os.rename(real, moved)  # real folder away, symlink in its place...
            os.rename(link, real)
            os.rename(real, link)  # ...and back
            os.rename(moved, real)
            swaps[0] += 1

    swapper = threading.Thread(target=dance)
    swapper.start()
    outcomes = {"read": 0, "refused": 0, "walked": 0}
    try:
        for _ in range(150):
            table, _, _ = scan(os.fsdecode(root))
            keys = table["key"].to_pylist()
            assert not any(k.endswith(b"/only-outside") for k in keys)  # never the outside folder's entries
            assert not any(k.startswith(SUB + b".link/") for k in keys)  # nor a symlink's, under any name
            outcomes["walked"] += SUB + b"/secret" in keys
            for key, row in zip(files["key"].to_pylist(), archive(repo, session, root, files).to_pylist(),
                                strict=True):
                if row["error"] is None:  # what was read is what was listed: the outside files' sizes differ
                    assert row["size"] == len(inside.get(key.rpartition(b"/")[2], b"top level file"))
                    outcomes["read"] += key.startswith(SUB)
                else:
                    assert row["error"] in (REPLACED, "vanished before it could be read")
                    assert row["chunks"] is None and row["content_hash"] is None
                    outcomes["refused"] += 1
    finally:
        stop.set()
        swapper.join()
    assert swaps[0] > 10 and outcomes["refused"] > 0 and outcomes["read"] > 0, (swaps, outcomes)
    assert stored(repo, session, outside_contents(outside)) == [False, False, False]
