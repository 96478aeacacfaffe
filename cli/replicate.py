"""`vaultflow replicate`: copy snapshots to replicas (a Prefect flow run per replica, flows/replicate.py), and
`--status`: how far each replica is behind, for people and for monitoring (`--json`), without a flow run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Iterator
from typing import Any

from vaultflow.storage.errors import VaultflowError
from vaultflow.tasks import settings
from vaultflow.tasks.fmt import human_bytes


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    r = sub.add_parser("replicate", parents=[common], help="copy snapshots to a replica at another location (same "
                       "keys, byte for byte, verified), or show each replica's lag with --status")
    r.add_argument("destinations", nargs="*", metavar="DEST",
                   help="replica path or fsspec URL, created when it holds no repository (default: every URL in "
                        "VAULTFLOW_REPLICAS, comma-separated)")
    r.add_argument("--snapshot", action="append", default=[], metavar="SNAPSHOT",
                   help="only this snapshot's source, up to it (id prefix, latest, SOURCE:latest or SOURCE:SERIAL; "
                        "repeatable); default: everything")
    r.add_argument("--status", action="store_true", help="print how far each replica is behind; copy nothing")
    r.add_argument("--json", action="store_true", help="print the result (or the status) as JSON")
    r.add_argument("--task-runner", metavar="RUNNER", default=None,
                   help="where copy batches run: auto, threads, processes, or dask://HOST:PORT")
    r.add_argument("--verbose", "-v", action="store_true", help="show Prefect's log lines")
    r.set_defaults(func=cmd_replicate)


def _destinations(args: argparse.Namespace) -> list[str]:
    """DEST arguments, else VAULTFLOW_REPLICAS; read without importing Prefect (see run._prefect)."""
    found: list[str] = args.destinations or [u.strip() for u in os.environ.get("VAULTFLOW_REPLICAS", "").split(",")
                                             if u.strip()]
    if not found:
        raise VaultflowError("name a replica (vaultflow replicate DEST) or list them in VAULTFLOW_REPLICAS "
                             "(comma-separated URLs)")
    return found


def cmd_replicate(args: argparse.Namespace) -> int:
    if args.status:
        return _status(args)
    from vaultflow import run

    rc = run._via_agent(args)
    return rc if rc is not None else run._direct(_replicate, args)


@contextlib.contextmanager
def _credentials_in_env(creds: dict[str, str]) -> Iterator[None]:
    """Credentials written into a replica's URL reach this run's workers through their environment, never
    through flow parameters; restored afterwards, so the next replica does not inherit them."""
    from vaultflow.tasks.replicate import ENV_OPTIONS, replica_options

    saved = os.environ.get(ENV_OPTIONS)
    if creds:
        os.environ[ENV_OPTIONS] = json.dumps({**replica_options(), **creds})
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(ENV_OPTIONS, None)
        else:
            os.environ[ENV_OPTIONS] = saved


def _replicate(args: argparse.Namespace) -> int:
    from vaultflow import run

    s = settings.resolve(args.repo, args.password_file, args.password_secret)
    destinations = _destinations(args)
    runtime = run._prefect(args.verbose)  # before anything imports prefect
    repo = run._open_first(s)
    from vaultflow.flows.replicate import ReplicationIncomplete
    from vaultflow.storage import replicate as repl
    from vaultflow.storage.repository import CONFIG
    from vaultflow.tasks import context
    from vaultflow.tasks.replicate import replica_backend

    for spec in args.snapshot:  # typos are refused before any flow run exists, so they page nobody
        repo.find_snapshot(spec)
    for dest in destinations:  # as is a location holding another repository, or this one
        backend = replica_backend(dest)
        if backend.exists(CONFIG):
            repl.open_replica(repo, backend, create=False)

    results: list[dict[str, Any]] = []
    rc = 0
    for dest in destinations:
        url, creds = settings.split_credentials(dest)
        context.preopen(repo)  # each run reuses the open source (its key is derived once)
        try:
            with _credentials_in_env(creds):
                summary = run._run(runtime, "replicate", "replicate", destination=url, snapshots=args.snapshot,
                                   repository=s.url, password_secret=s.password_secret, **run._runner(args))
        except ReplicationIncomplete as e:
            summary, rc = e.summary, 1
        except VaultflowError as e:  # one unreachable replica does not keep the others behind
            print(f"vaultflow: error: {settings.redact(dest)}: {e}", file=sys.stderr)
            results.append({"replica": settings.redact(dest), "error": str(e)})
            rc = 1
            continue
        results.append(summary.model_dump())
        if not args.json:
            run._print_rows(summary.rows())
            for name, why in summary.failed:
                print(f"vaultflow: error: {name}: {why}", file=sys.stderr)
            for pack in summary.lost_packs:
                print(f"warning: pack {pack} is lost on the source" + (" (the replica has it: copy it back)"
                      if pack in summary.lost_kept else "; it was not copied"), file=sys.stderr)
            for warning in summary.warnings:
                print(f"warning: {warning}", file=sys.stderr)
    if args.json:
        print(json.dumps(results, indent=1))
    return rc


def status(repo: Any, dest: str, snapshots: list[str]) -> dict[str, Any]:
    """One replica's lag as a JSON-ready dict; `error` says why it could not be measured."""
    from vaultflow.storage import replicate as repl
    from vaultflow.storage.repository import CONFIG
    from vaultflow.tasks.replicate import lag_of, replica_backend

    out: dict[str, Any] = {"replica": settings.redact(dest), "exists": False, "replica_id": None, "error": None}
    try:
        backend = replica_backend(dest)
        if backend.exists(CONFIG):
            rep, _ = repl.open_replica(repo, backend, create=False)
            out.update(exists=True, replica_id=rep.config.id, replica_of=repl.read_marker(backend,
                                                                                         repl.marker_key(repo)))
        plan = repl.plan(repo, backend, snapshots or None)
    except Exception as e:  # noqa: BLE001 - one unreachable replica must not hide the others' lag
        out["error"] = str(e) if isinstance(e, VaultflowError) else f"{type(e).__name__}: {e}"
        return out
    out.update(lag_of(plan, dest).model_dump(), lost_packs=plan.lost_packs, lost_kept=plan.lost_kept,
               damaged=sorted(plan.damaged))
    return out


def _status(args: argparse.Namespace) -> int:
    from vaultflow.storage.repository import Repository

    s = settings.resolve(args.repo, args.password_file, args.password_secret)
    destinations = _destinations(args)
    repo = Repository.open(s.url, s.password(), storage_options=s.storage_options)
    found = [status(repo, dest, args.snapshot) for dest in destinations]
    if args.json:
        print(json.dumps({"repository": repo.config.id, "replicas": found}, indent=1))
    for r in [] if args.json else found:
        if r["error"]:
            print(f"{r['replica']}: error: {r['error']}")
            continue
        where = f"replica {r['replica_id']}" if r["exists"] else "not created yet"
        print(f"{r['replica']} ({where}): {r['snapshots_behind']} snapshots, {r['objects_behind']} objects, "
              f"{human_bytes(r['bytes_behind'])} behind")
        for source, (theirs, ours) in sorted(r["sources"].items()):
            print(f"  {source}: serial {theirs} on the source, {ours or '-'} on the replica")
        for pack in r["lost_packs"]:
            print(f"  warning: pack {pack} is lost on the source" + (" (the replica has it)"
                  if pack in r["lost_kept"] else ""))
    return 1 if any(r["error"] for r in found) else 0
