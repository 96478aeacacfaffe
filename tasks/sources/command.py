"""The command source: one program's stdout stored as a stream (restic's --stdin-from-command).

`command:pg_dumpall -h 127.0.0.1` runs `pg_dumpall` with those arguments — split like a shell would (shlex), but
never run by one — and stores what it writes as the stream `stdin`; `command[all.sql]:pg_dumpall …` names it
`all.sql`. A non-zero exit or a signal fails the snapshot (base.command_stream): nothing partial is committed.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
from pathlib import Path
from typing import Any, BinaryIO

from vaultflow.storage.errors import SourceError

from .base import Capture, Source, SourceSpec, command_stream, held, slug, stream_listing

DEFAULT_STREAM = "stdin"
_FORM = re.compile(r"command(?:\[(?P<name>[^\]]*)\])?:(?P<command>.*)", re.DOTALL)
_STREAM_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_PASSWORD_IN_URL = re.compile(r"://[^/@\s]*:[^/@\s]*@")  # scheme://user:password@host


def command_path(command: str, stream: str | None = None) -> str:
    """The source path for `--stdin-from-command COMMAND [--stdin-filename STREAM]`."""
    return f"command[{stream}]:{command}" if stream else f"command:{command}"


def parse(path: str) -> tuple[str, list[str]]:
    """(stream name, argv) of a command path; refuses an empty command, a bad stream name, and a password in a
    URL argument (arguments are recorded in the snapshot: secrets belong in the environment)."""
    m = _FORM.fullmatch(path)
    if m is None:
        raise SourceError(f"{path!r} is not a command source; write command:PROGRAM ARGS…")
    stream = m["name"] if m["name"] is not None else DEFAULT_STREAM
    if not _STREAM_NAME.fullmatch(stream):
        raise SourceError(f"stream name {stream!r} of {path!r}: use letters, digits, '.', '_' and '-' (up to 128)")
    try:
        argv = shlex.split(m["command"])
    except ValueError as e:
        raise SourceError(f"cannot split the command of {path!r} into words: {e}") from None
    if not argv:
        raise SourceError(f"{path!r} names no program; write command:PROGRAM ARGS…")
    if any(_PASSWORD_IN_URL.search(word) for word in argv):
        raise SourceError(f"the command of source command:{argv[0]} has a password in a URL argument; arguments "
                          "are recorded in the snapshot: pass the password in the environment (e.g. PGPASSWORD)")
    return stream, argv


class CommandReader:
    """Runs the command where the batch runs and hands its stdout over; its exit status is checked on close."""

    streams = True

    def __init__(self, path: str) -> None:
        self.stream, self.argv = parse(path)

    def open(self, key: bytes) -> contextlib.AbstractContextManager[BinaryIO]:
        if key.decode() != self.stream:
            raise SourceError(f"command {self.argv[0]} writes the one stream {self.stream!r}, not {key!r}")
        return command_stream(self.argv, f"stream {self.stream} (command {self.argv[0]})")

    def identity(self, key: bytes) -> tuple[int, int, int]:
        return 0, 0, 0

    def tables(self, key: bytes) -> list[dict[str, Any]]:
        return []


class Command(Source):
    """`command[STREAM]:PROGRAM ARGS…` — a program's stdout as one stream (default name `stdin`)."""

    kind = "command"
    streams = True

    @classmethod
    def matches(cls, path: str) -> bool:
        return _FORM.fullmatch(path) is not None

    @property
    def url(self) -> str:
        return self.paths[0]  # the command line as given: the record keeps it (which is why no password may be in it)

    def default_name(self) -> str:
        """command:/usr/bin/pg_dumpall -h db1 → command-pg_dumpall."""
        return slug(f"command-{os.path.basename(parse(self.paths[0])[1][0])}")

    def check(self) -> None:
        program = parse(self.paths[0])[1][0]
        if shutil.which(program) is None:
            raise SourceError(f"cannot back up the output of {program}: not found on PATH (or not executable)")

    def capture(self, scratch: Path, excludes: list[str]) -> contextlib.AbstractContextManager[Capture]:
        """Nothing to hold: the command runs when its stream is read. `excludes` do not apply."""
        stream, _ = parse(self.paths[0])
        return held(Capture(listing=stream_listing([stream]), root=self.paths[0]))

    @classmethod
    def reader(cls, spec: SourceSpec) -> CommandReader:
        return CommandReader(spec.root)
