"""The command source (restic's --stdin-from-command): a program's stdout restores byte for byte, a failing program
commits nothing, and what cannot run or must not be recorded is refused in one line."""

from __future__ import annotations

import os
import random
import sys

import pytest
from backup_helpers import read_back
from conftest import FAST_KDF

from vaultflow.storage.errors import SourceError
from vaultflow.storage.repository import Repository
from vaultflow.tasks.sources import for_paths
from vaultflow.tasks.sources.command import Command, command_path

# 12 MB of every byte value, written in uneven pieces: what goes in must come out, byte for byte
PRODUCER = """import random, sys
r = random.Random(int(sys.argv[1]))
for _ in range(12):
    sys.stdout.buffer.write(r.randbytes(1 << 20))
sys.stdout.buffer.write(b"end")
"""


def produced(seed: int) -> bytes:
    r = random.Random(seed)
    return b"".join(r.randbytes(1 << 20) for _ in range(12)) + b"end"


def test_a_commands_stdout_is_a_stream_that_restores_byte_for_byte(prefect_server, monkeypatch, tmp_path):
    from vaultflow.flows.backup import backup
    from vaultflow.flows.runtime import run_flow

    monkeypatch.setenv("VAULTFLOW_PASSWORD", "pw")
    repo = Repository.init(str(tmp_path / "repo"), "pw", kdf=FAST_KDF)
    script = tmp_path / "producer.py"
    script.write_text(PRODUCER)
    path = command_path(f"{sys.executable} {script} 7", "random.bin")

    summary = run_flow(backup, paths=[path], repository=repo.url)
    assert summary.source == f"command-{os.path.basename(sys.executable)}"
    assert summary.files == 1 and summary.bytes_read == 12 * (1 << 20) + 3
    assert read_back(repo) == {b"random.bin": produced(7)}
    _, record = repo.find_snapshot("latest")
    assert record.paths == [path]  # the command line is recorded as given

    plain = run_flow(backup, paths=["command:printf 'one\\ntwo\\n'"], repository=repo.url)
    assert plain.source == "command-printf"
    assert read_back(Repository.open(repo.url, "pw"), "command-printf:1") == {b"stdin": b"one\ntwo\n"}


def test_a_command_that_exits_non_zero_fails_the_run_and_commits_nothing(prefect_server, monkeypatch, tmp_path):
    from vaultflow.flows.backup import backup
    from vaultflow.flows.runtime import run_flow

    monkeypatch.setenv("VAULTFLOW_PASSWORD", "pw")
    repo = Repository.init(str(tmp_path / "repo"), "pw", kdf=FAST_KDF)
    with pytest.raises(SourceError, match=r"exited with status 3: oops; nothing was committed"):
        run_flow(backup, paths=["command:sh -c 'echo partial; echo oops >&2; exit 3'"], repository=repo.url)
    assert Repository.open(repo.url, "pw").snapshots() == {}


def test_check_and_parse_refuse_in_one_line(tmp_path):
    cases = [
        ("command:no-such-program-4f2a --all", "no-such-program-4f2a: not found on PATH"),
        ("command:", "names no program"),
        ("command:sh -c 'unbalanced", "cannot split"),
        ("command[../x]:cat /etc/hostname", "stream name '../x'"),
        ("command:pg_dump postgresql://ann:s3cret@db/app", "password in a URL argument"),
    ]
    for path, expected in cases:
        source = for_paths([path])
        assert isinstance(source, Command)
        with pytest.raises(SourceError, match=expected) as e:
            source.check()
        assert "\n" not in str(e.value) and "s3cret" not in str(e.value)
    for_paths(["command:sh -c true"]).check()  # a program on PATH passes
    for_paths([f"command:{sys.executable} -V"]).check()  # so does one named by its path
