"""A local user who can write in the restore target swaps what restore created for links or other files while it
runs: nothing outside the target is ever written, chmod'ed or linked, and the entries touched fail by name."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
from conftest import FAST_KDF
from test_hostile_restore import malicious_snapshot

from vaultflow.storage.repository import Repository
from vaultflow.storage.restorer import Restorer


def state(folder: Path) -> dict[str, tuple[bytes, int, int, int, int]]:
    """Everything restore could change in a folder: each entry's content, mode, link count, mtime and inode."""
    out = {}
    for p in [folder, *sorted(folder.iterdir())]:
        st = os.lstat(p)
        out[p.name] = (b"" if p.is_dir() else p.read_bytes(), st.st_mode, st.st_nlink, st.st_mtime_ns, st.st_ino)
    return out


def outside_folder(tmp_path: Path, names: dict[str, bytes]) -> Path:
    """A folder outside the target holding files named like the restored ones (mode 0600); `pwned` content
    matches what the manifest restores, so only a check of the inode, not of the hash, can tell them apart."""
    outside = tmp_path / "outside"
    outside.mkdir()
    for name, data in names.items():
        (outside / name).write_bytes(data)
        (outside / name).chmod(0o600)
    os.utime(outside, ns=(10**18, 10**18))
    return outside


ROWS = [
    {"path": "d", "type": "dir"},
    {"path": "d/f.txt", "type": "file", "mode": 0o100666},
    {"path": "d/h", "type": "file", "mode": 0o100666, "inode": 7, "nlink": 2},
    {"path": "e", "type": "dir"},
    {"path": "e/h2", "type": "file", "mode": 0o100666, "inode": 7, "nlink": 2},  # a hard link to d/h
    {"path": "keep.txt", "type": "file"},
    {"path": "x.txt", "type": "file", "mode": 0o100666},
    {"path": "y.txt", "type": "file", "mode": 0o100666},
]


def prepared(tmp_path: Path) -> tuple[Repository, Restorer, list[str], Path, Path]:
    """ROWS prepared for restore into tmp_path/target (folders and empty files made), and a folder outside the
    target that an intruder points into: (repo, restorer, packs, target, outside)."""
    repo = Repository.init(str(tmp_path / "repo"), "pw", kdf=FAST_KDF)
    table = repo.files_table(malicious_snapshot(repo, ROWS))
    outside = outside_folder(tmp_path, {"f.txt": b"precious", "h": b"pwned", "x.txt": b"pwned", "y.txt": b"mine"})
    target = tmp_path / "target"
    restorer = Restorer(repo, table, str(target))
    return repo, restorer, restorer.prepare(), target, outside


def swap_entry(swap: str, target: Path, outside: Path) -> None:
    """What a local user does to the prepared target; moved things go beside it (moved-d, moved-target)."""
    if swap == "dir-to-link":  # restore's own directory moves away, a link to the outside folder takes its place
        os.rename(target / "d", target.parent / "moved-d")
        os.symlink(outside, target / "d")
    elif swap == "file-to-link":
        os.unlink(target / "x.txt")
        os.symlink(outside / "x.txt", target / "x.txt")
    elif swap == "file-to-hardlink":  # another inode under the file's name: a hard link to an outside file
        os.unlink(target / "y.txt")
        os.link(outside / "y.txt", target / "y.txt")
    elif swap == "target-replaced":  # the whole target renamed away, another folder put in its place
        os.rename(target, target.parent / "moved-target")
        os.mkdir(target)
    else:
        raise ValueError(swap)


@pytest.mark.parametrize("swap", ["dir-to-link", "file-to-link", "file-to-hardlink"])
def test_entries_swapped_between_the_steps_fail_and_nothing_outside_changes(tmp_path, swap):
    repo, restorer, packs, target, outside = prepared(tmp_path)
    if swap != "file-to-link":
        swap_entry(swap, target, outside)
    before = state(outside)
    restorer.restore_packs(packs)
    if swap == "file-to-link":  # after the data is written, before it is verified and chmod'ed
        swap_entry(swap, target, outside)
    result = restorer.finish()

    assert state(outside) == before  # not written, not chmod'ed, not linked, nothing created in it
    swapped = {"dir-to-link": {"d", "d/f.txt", "d/h"}, "file-to-link": {"x.txt"},
               "file-to-hardlink": {"y.txt"}}[swap]
    also = {"e/h2": "hard link target 'd/h' failed"} if swap == "dir-to-link" else {}
    assert set(result.failed) == swapped | set(also)
    for path in swapped:
        assert "changed in the target during the restore (swapped?); not written" in result.failed[path], path
    assert all(result.failed[path] == why for path, why in also.items())
    restored = {"d/f.txt", "d/h", "e/h2", "keep.txt", "x.txt", "y.txt"} - set(result.failed)
    for path in restored:
        assert (target / path).read_bytes() == b"pwned", path
    if swap == "dir-to-link":
        assert os.readlink(target / "d") == str(outside)  # left as the intruder made it
        assert (tmp_path / "moved-d" / "f.txt").read_bytes() == b"\0" * 5  # pre-created, never written
        assert not (target / "e" / "h2").exists()
    else:
        assert os.lstat(target / "d" / "h").st_ino == os.lstat(target / "e" / "h2").st_ino
    if swap == "file-to-hardlink":
        assert os.lstat(target / "y.txt").st_ino == os.lstat(outside / "y.txt").st_ino  # not replaced either


def test_a_directory_swapped_for_a_link_during_a_whole_restore_never_lets_it_write_outside(tmp_path):
    """A thread renames `d` away and puts a link to the outside folder in its place, again and again, while
    Restorer.run() creates, writes, verifies, links and chmods; repeated for a bounded number of rounds."""
    n = 150
    rows = [{"path": "d", "type": "dir"}, {"path": "e", "type": "dir"}]
    rows += [{"path": f"d/f{k:03d}", "type": "file", "mode": 0o100666, "inode": 1000 + k, "nlink": 2}
             for k in range(n)]
    rows += [{"path": f"e/f{k:03d}", "type": "file", "mode": 0o100666, "inode": 1000 + k, "nlink": 2}
             for k in range(n)]  # hard links to the files in d: created from d after the data is verified
    repo = Repository.init(str(tmp_path / "repo"), "pw", kdf=FAST_KDF)
    table = repo.files_table(malicious_snapshot(repo, rows))
    outside = outside_folder(tmp_path, {f"f{k:03d}": b"pwned" if k % 2 else b"precious" for k in range(n)})
    before = state(outside)
    swaps, dancer_errors = 0, []
    for round_ in range(8):
        target = tmp_path / f"target{round_}"
        stop = threading.Event()
        rest = (0.0002, 0.002, 0.01, 0.03)[round_ % 4]  # time the real directory stays: from none to most phases

        def dance(target: Path = target, stop: threading.Event = stop, rest: float = rest) -> None:
            nonlocal swaps
            try:
                while not stop.is_set():
                    if not os.path.lexists(target / "d" / "f010"):  # let prepare get past `d` itself first
                        time.sleep(0.0002)
                        continue
                    os.rename(target / "d", target / "d.real")
                    os.symlink(outside, target / "d")
                    swaps += 1
                    time.sleep(0.0002)
                    os.unlink(target / "d")
                    os.rename(target / "d.real", target / "d")
                    time.sleep(rest)
            except OSError as e:  # the test would silently stop racing
                dancer_errors.append(e)

        dancer = threading.Thread(target=dance)
        dancer.start()
        try:
            result = Restorer(repo, table, str(target), workers=2).run()
        finally:
            stop.set()
            dancer.join()
        assert dancer_errors == [] and state(outside) == before, f"round {round_}"
        assert sorted(os.listdir(target)) == ["d", "e"] and (target / "d").is_dir() and not (target / "d").is_symlink()
        for path, why in result.failed.items():
            assert any(s in why for s in ("(swapped?)", "hard link target", "was not restored")), (path, why)
        for k in range(n):
            for d in "de":
                if f"{d}/f{k:03d}" not in result.failed:
                    assert (target / d / f"f{k:03d}").read_bytes() == b"pwned", (d, k)
    assert swaps > 0
