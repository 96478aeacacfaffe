"""`vaultflow ls`, `snapshots` and `key` in-process: names cannot drive the terminal, missing paths are errors,
`-l` goes anywhere, and key files are listed with their info and removed by the id users copy."""

from __future__ import annotations

import json
import os
import re
import socket

import pytest
from conftest import FAST_KDF

from vaultflow.cli import main
from vaultflow.storage.repository import Repository

EVIL = "evil\x1b]0;pwned\x07\x1b[2J\x7f\u009b31m\u202etxt.exe"  # OSC title, clear screen, DEL, C1 CSI, RLO
RAW_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u202e]")


@pytest.fixture
def backed_up(prefect_server, tmp_path, monkeypatch):
    """A local repository with one real backup of a tree whose names and link target carry escape sequences."""
    from vaultflow.flows.backup import backup
    from vaultflow.flows.runtime import run_flow

    url = str(tmp_path / "repo")
    monkeypatch.setenv("VAULTFLOW_REPOSITORY", url)
    monkeypatch.setenv("VAULTFLOW_PASSWORD", "pw")
    monkeypatch.setenv("VAULTFLOW_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("VAULTFLOW_STORAGE_OPTIONS", raising=False)
    Repository.init(url, "pw", kdf=FAST_KDF)
    src = tmp_path / "src\x1b[0m"
    (src / "docs").mkdir(parents=True)
    (src / EVIL).write_text("x")
    (src / "docs" / "a.txt").write_text("a")
    (src / "docs" / "b.txt").write_text("b")
    os.symlink("\x1b[31mred-target", src / "link")
    run_flow(backup, paths=[str(src)], source="tree", repository=url)
    return src


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_human_output_escapes_control_characters_and_json_stays_exact(backed_up, capsys):
    code, out, err = run(capsys, "ls", "latest")
    assert code == 0 and not RAW_CONTROL.search(out.replace("\n", "")) and not RAW_CONTROL.search(err[:-1])
    assert "evil\\x1b]0;pwned\\x07\\x1b[2J\\x7f\\x9b31m\\u202etxt.exe" in out.splitlines()
    code, out, _ = run(capsys, "ls", "latest", "-l")
    assert code == 0 and not RAW_CONTROL.search(out.replace("\n", ""))
    assert any(line.endswith("link -> \\x1b[31mred-target") for line in out.splitlines())
    code, out, _ = run(capsys, "snapshots")
    assert code == 0 and not RAW_CONTROL.search(out.replace("\n", "")) and "src\\x1b[0m" in out
    code, out, _ = run(capsys, "snapshots", "--json")
    assert code == 0 and json.loads(out)[0]["paths"] == [str(backed_up)]  # exact, escapes included
    code, _, err = run(capsys, "ls", "latest", "docs/\x1b[2J")
    assert code == 1 and "docs/\\x1b[2J: not in snapshot" in err and "\x1b" not in err


def test_ls_of_a_path_not_in_the_snapshot_fails_and_says_so(backed_up, capsys):
    code, out, err = run(capsys, "ls", "latest", "no/such/path")
    assert code == 1 and out == ""
    assert "no/such/path: not in snapshot" in err and "tree #1" in err


@pytest.mark.parametrize("order", [["latest", "-l", "docs"], ["-l", "latest", "docs"], ["latest", "docs", "-l"],
                                   ["latest", "--long", "docs"]])
def test_ls_long_flag_goes_before_between_or_after_the_positionals(backed_up, capsys, order):
    code, out, err = run(capsys, "ls", *order)
    lines = out.splitlines()
    assert code == 0, err
    assert [line.rsplit(" ", 1)[-1] for line in lines] == ["docs", "docs/a.txt", "docs/b.txt"]
    assert all(line.startswith(("drwx", "-rw")) for line in lines)  # long format


def test_ls_still_refuses_a_third_positional(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["ls", "latest", "-l", "docs", "extra"])
    assert exit_.value.code == 2 and "unrecognized arguments: docs extra" in capsys.readouterr().err


@pytest.fixture
def repo(tmp_path, monkeypatch) -> Repository:
    url = str(tmp_path / "repo")
    monkeypatch.setenv("VAULTFLOW_REPOSITORY", url)
    monkeypatch.setenv("VAULTFLOW_PASSWORD", "pw")
    monkeypatch.setenv("VAULTFLOW_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("USER", "carol")
    monkeypatch.delenv("VAULTFLOW_STORAGE_OPTIONS", raising=False)
    return Repository.init(url, "pw", kdf=FAST_KDF)


def test_key_list_shows_created_host_user_and_marks_damaged_files(repo, capsys):
    second = repo.add_key("second", FAST_KDF)
    damaged = "keys/" + "0" * 32
    repo.backend.write(damaged, b"{\"junk\": 1}")
    code, out, err = run(capsys, "key", "list")
    assert code == 0 and "created" in err and "host" in err and "user" in err
    lines = {line[2:].split()[0]: line for line in out.splitlines()}
    assert set(lines) == {repo.key_name[5:], second[5:], damaged[5:]}
    created = {k.name: k.created for k in repo.describe_keys()}
    assert lines[repo.key_name[5:]].split() == ["*", repo.key_name[5:], created[repo.key_name],
                                                socket.gethostname(), "carol"]
    assert lines[second[5:]].startswith("  ") and lines[second[5:]].endswith("carol")
    assert lines[damaged[5:]].startswith("! ") and "DAMAGED" in lines[damaged[5:]]


def test_key_remove_takes_the_bare_id_keys_prefix_or_a_unique_prefix(repo, capsys):
    ids = [repo.add_key(f"pw{i}", FAST_KDF) for i in range(3)]
    code, out, _ = run(capsys, "key", "remove", ids[0][5:])  # the bare id that `key list` shows
    assert code == 0 and out.strip() == f"removed {ids[0]}"
    code, out, _ = run(capsys, "key", "remove", ids[1])  # keys/<id>
    assert code == 0 and out.strip() == f"removed {ids[1]}"
    code, out, _ = run(capsys, "key", "remove", ids[2][5:12])  # a unique prefix
    assert code == 0 and out.strip() == f"removed {ids[2]}"
    assert repo.list_keys() == [repo.key_name]
    code, _, err = run(capsys, "key", "remove", "nope")
    assert code == 1 and "matches no key file" in err


def test_snapshots_warns_about_a_damaged_record_and_lists_the_rest(repo, capsys):
    """One damaged record is skipped by `snapshots`, never silently: a warning names it on stderr."""
    from vaultflow.storage.snapshot import SnapshotRecord, utc_now

    good = SnapshotRecord(source="docs", serial=1, started=utc_now(), finished=utc_now(), host="h", parent=None,
                          previous=None, manifests={})
    rid = repo.commit(good)
    data = bytearray(repo.backend.read(f"snapshots/{rid}"))
    data[30] ^= 1
    repo.backend.write("snapshots/" + "0" * 64, bytes(data))
    assert main(["snapshots", "--json"]) == 0
    out, err = capsys.readouterr()
    assert [s["id"] for s in json.loads(out)] == [rid]
    assert f"snapshots/{'0' * 64}" in err and "damaged and not listed" in err and "claims docs #1" in err
