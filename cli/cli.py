"""The `vaultflow` command: a thin shell over the flows (backups are Prefect flow runs) and storage/.

Read-only and key commands never import Prefect, so they start in a fraction of a second.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from vaultflow import __version__
from vaultflow.storage.errors import VaultflowError

from . import settings


def cmd_init(args: argparse.Namespace) -> int:
    from vaultflow.storage.repository import Repository

    s = settings.resolve(args.repo, args.password_file, args.password_secret)
    repo = Repository.init(s.url, s.password(confirm=True), storage_options=s.storage_options,
                           private_manifests=args.private_manifests)
    print(f"created vaultflow repository {repo.config.id} at {repo.url}")
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
        for name in repo.list_keys():
            print(f"{'*' if name == repo.key_name else ' '} {name}")
    elif args.key_command == "add":
        print(f"added {repo.add_key(_new_password())}")
    elif args.key_command == "passwd":
        print(f"password changed; new key {repo.change_password(_new_password())}")
    elif args.key_command == "remove":
        repo.remove_key(args.name)
        print(f"removed {args.name}")
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
    init.set_defaults(func=cmd_init)

    key = sub.add_parser("key", parents=[common], help="manage the repository's passwords (key files)")
    key_sub = key.add_subparsers(dest="key_command", required=True)
    key_sub.add_parser("list", help="list key files (* marks the one your password opens)")
    key_sub.add_parser("add", help="add a password (VAULTFLOW_NEW_PASSWORD or a prompt)")
    key_sub.add_parser("passwd", help="change this password (adds the new key, removes the old)")
    rm = key_sub.add_parser("remove", help="remove a key file by name")
    rm.add_argument("name")
    key.set_defaults(func=cmd_key)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except VaultflowError as e:
        print(f"vaultflow: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("vaultflow: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
