"""The `vaultflow` command: a thin shell over the flows (backups are Prefect flow runs) and storage/.

Read-only and key commands never import Prefect, so they start in a fraction of a second.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

from vaultflow import __version__
from vaultflow.storage.errors import VaultflowError
from vaultflow.tasks import settings


def cmd_init(args: argparse.Namespace) -> int:
    from vaultflow.storage.repository import Repository

    s = settings.resolve(args.repo, args.password_file, args.password_secret)
    if not -7 <= args.compression_level <= 19:
        raise VaultflowError(f"--compression-level {args.compression_level}: zstd levels run from -7 to 19")
    lock = (args.object_lock_mode, args.object_lock) if args.object_lock else None
    if lock is not None and not 1 <= args.object_lock <= 36500:
        raise VaultflowError(f"--object-lock {args.object_lock}: give the retention in days, 1 to 36500")
    repo = Repository.init(s.url, s.password(confirm=True), storage_options=s.storage_options,
                           private_manifests=args.private_manifests, compression_level=args.compression_level,
                           object_lock=lock)
    print(f"created vaultflow repository {repo.config.id} at {repo.url}")
    if lock:
        print(f"every pack, index file, manifest and snapshot record is written with S3 Object Lock "
              f"({lock[0].lower()} mode, {lock[1]} days); prune extends what is still needed, object by object")
    print("keep the password safe: without it the data cannot be read back")
    return 0


def _open(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from vaultflow.storage.repository import Repository

    s = settings.resolve(args.repo, args.password_file, args.password_secret)
    return Repository.open(s.url, s.password(), storage_options=s.storage_options)


def _new_password() -> str:
    import os

    if os.environ.get("VAULTFLOW_NEW_PASSWORD_FILE"):
        return settings.read_password(os.environ["VAULTFLOW_NEW_PASSWORD_FILE"], None)
    if os.environ.get("VAULTFLOW_NEW_PASSWORD"):
        return os.environ["VAULTFLOW_NEW_PASSWORD"]
    import getpass

    if not sys.stdin.isatty():
        raise VaultflowError("set VAULTFLOW_NEW_PASSWORD or VAULTFLOW_NEW_PASSWORD_FILE for the new password")
    pw = getpass.getpass("new password: ")
    if not pw or getpass.getpass("repeat new password: ") != pw:
        raise VaultflowError("the new passwords were empty or did not match")
    return pw


def cmd_key(args: argparse.Namespace) -> int:
    repo = _open(args)
    if args.key_command == "list":
        from . import show

        return show.keys(repo)
    elif args.key_command == "add":
        print(f"added {repo.add_key(_new_password())}")
    elif args.key_command == "passwd":
        print(f"password changed; new key {repo.change_password(_new_password())}")
    elif args.key_command == "remove":
        print(f"removed {repo.remove_key(args.name)}")
    return 0


def cmd_snapshots(args: argparse.Namespace) -> int:
    from . import show

    return show.snapshots(_open(args), args.json, args.source)


def cmd_ls(args: argparse.Namespace) -> int:
    from . import show

    return show.ls(_open(args), args.snapshot, args.path, args.long)


def cmd_stats(args: argparse.Namespace) -> int:
    from . import show

    return show.stats(_open(args), args.json)


def cmd_repair(args: argparse.Namespace) -> int:
    from vaultflow.storage.checker import rebuild_index

    repo = _open(args)
    if args.what == "snapshots":
        return _repair_snapshots(repo)
    with repo.lock(exclusive=True, purpose="repair index"):
        packs, chunks, unreadable = rebuild_index(repo)
    print(f"rebuilt the index from {packs} pack trailers: {chunks} chunks")
    for name in unreadable:
        print(f"pack {name}: trailer unreadable, its chunks are not indexed (see `vaultflow check --read-data`)",
              file=sys.stderr)
    return 1 if unreadable else 0


def _repair_snapshots(repo: Any) -> int:
    from vaultflow.storage.retention import quarantine_damaged

    done = quarantine_damaged(repo, __version__)
    for q in done:
        where = f"{q.source}#{q.serial}" if q.source is not None else "of no known source"
        how = f"tombstone {q.tombstone[:12]} records it" if q.tombstone else "no chain to record it in"
        print(f"quarantined damaged record {q.id[:12]} ({where}): {q.reason}; kept as quarantine/snapshots/"
              f"{q.id[:12]}…; {how}")
    print(f"{len(done)} damaged snapshot records quarantined" if done else "no damaged snapshot records")
    return 0


def cmd_server(args: argparse.Namespace) -> int:
    from vaultflow.flows import runtime

    if args.server_command == "start":
        print(f"Prefect API at {runtime.ensure_prefect_api()}")
    elif args.server_command == "stop":
        print("stopped" if runtime.stop_embedded_server() else "not running")
    else:
        print(runtime.embedded_server_status().describe())
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vaultflow", description="Deduplicated, encrypted, verified backups; "
                                "every backup is a Prefect flow run.")
    p.add_argument("--version", action="version", version=f"vaultflow {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--repo", "-r", help="repository path or fsspec URL (env VAULTFLOW_REPOSITORY; "
                        "default ~/.vaultflow/repo)")
    common.add_argument("--password-file", help="read the password from this file (env VAULTFLOW_PASSWORD_FILE; "
                        "or set VAULTFLOW_PASSWORD)")
    common.add_argument("--password-secret", help="name of a Prefect Secret block holding the password "
                        "(env VAULTFLOW_PASSWORD_SECRET)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    init = sub.add_parser("init", parents=[common], help="create a repository")
    init.add_argument("--private-manifests", action="store_true",
                      help="encrypt manifests (paths) too; analysts then need vaultflow to read them")
    init.add_argument("--compression-level", type=int, default=1, metavar="N",
                      help="zstd level for data, -7 (fastest) to 19 (smallest); default 1")
    init.add_argument("--object-lock", type=int, metavar="DAYS", default=0,
                      help="S3 only: write every immutable object with Object Lock retention of DAYS (the bucket "
                           "must have Object Lock enabled); credentials that cannot delete then cannot destroy "
                           "history")
    init.add_argument("--object-lock-mode", choices=["governance", "compliance"], default="compliance",
                      help="compliance (nobody can shorten it; default) or governance (a privileged user can)")
    init.set_defaults(func=cmd_init)

    key = sub.add_parser("key", parents=[common], help="manage the repository's passwords (key files)")
    key_sub = key.add_subparsers(dest="key_command", required=True)
    key_sub.add_parser("list", help="list key files with created time, host and user (* marks the one your "
                       "password opens, ! a damaged one)")
    key_sub.add_parser("add", help="add a password (VAULTFLOW_NEW_PASSWORD or a prompt)")
    key_sub.add_parser("passwd", help="change this password (adds the new key, removes the old)")
    rm = key_sub.add_parser("remove", help="remove a key file")
    rm.add_argument("name", help="its id as `key list` shows it, keys/<id>, or a unique prefix of the id")
    key.set_defaults(func=cmd_key)

    from . import run

    run.add_parsers(sub, common)
    from . import audit, forget, metrics, prune, replicate, serve

    forget.add_parser(sub, common)
    prune.add_parser(sub, common)
    replicate.add_parser(sub, common)
    metrics.add_parser(sub, common)
    audit.add_parser(sub, common)
    serve.add_parser(sub, common)
    for name in ("backup", "restore", "check", "restore-test"):
        sub.choices[name].add_argument(
            "--task-runner", metavar="RUNNER", default=None,
            help="where batches run: auto (default: worker processes for large runs, else threads), threads, "
                 "processes, or dask://HOST:PORT of a Dask scheduler (env VAULTFLOW_TASK_RUNNER)")

    snaps = sub.add_parser("snapshots", parents=[common], help="list snapshots (no Prefect involved)")
    snaps.add_argument("--json", action="store_true", help="machine-readable output")
    snaps.add_argument("--source", help="only this source")
    snaps.set_defaults(func=cmd_snapshots)

    lsp = sub.add_parser("ls", parents=[common], help="list the files of a snapshot")
    lsp.add_argument("snapshot", help="id prefix, 'latest', SOURCE:latest or SOURCE:SERIAL")
    lsp.add_argument("path", nargs="?", help="only this path and what is below it")
    lsp.add_argument("--long", "-l", action="store_true", help="mode, size, time, link targets, errors")
    lsp.set_defaults(func=cmd_ls)

    st = sub.add_parser("stats", parents=[common], help="repository size, packs, chunks, snapshots")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=cmd_stats)

    rep = sub.add_parser("repair", parents=[common], help="repair the repository")
    rep.add_argument("what", choices=["index", "snapshots"], help="index: rebuild the index from pack trailers "
                     "alone; snapshots: move damaged snapshot records to quarantine/ and record that in their "
                     "source's chain (the other snapshots were never blocked by them)")
    rep.set_defaults(func=cmd_repair)

    srv = sub.add_parser("server", help="the embedded local Prefect server (UI and run history)")
    srv.add_argument("server_command", choices=["status", "start", "stop"])
    srv.set_defaults(func=cmd_server)
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Like parse_args, except that `ls SNAPSHOT -l PATH` and `restore SNAPSHOT --stream NAME -` work: argparse
    fills an optional positional with nothing when an option separates it from SNAPSHOT, and leaves it over."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    late = {"ls": "path", "restore": "target"}.get(args.command)  # the optional positional after options
    if late and getattr(args, late) is None and len(extra) == 1 and (extra[0] == "-" or extra[0][:1] != "-"):
        setattr(args, late, extra.pop())
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except VaultflowError as e:
        from .show import safe

        text = "\n".join(safe(line) for line in str(e).split("\n"))  # names in it must not drive the terminal
        print(f"vaultflow: error: {text}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("vaultflow: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `vaultflow ls … | head`: the reader left, which is not an error
        sys.stderr.close()
        return 0


def console() -> None:
    """The `vaultflow` program: main(), the process's exit handlers (Prefect's drain among them), then an exit that
    skips the interpreter's teardown. pyarrow's thread pools can abort the process there ("terminate called
    without an active exception", SIGABRT after the command succeeded: apache/arrow#34314), which seen from a
    script is a failed command; nothing of vaultflow's runs in that teardown."""
    import atexit
    import os

    code = main()
    atexit._run_exitfuncs()  # noqa: SLF001 - what a normal exit runs first
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            code = code or 1  # stdout closed or full: what was printed did not arrive
    os._exit(code)


if __name__ == "__main__":
    console()
