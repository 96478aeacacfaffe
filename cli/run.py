"""Flow commands (`backup`): each is a real Prefect flow run against a local API that starts or is reused.

Prefect is imported only here, after `PrefectRuntime.start()` has set PREFECT_API_URL.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from vaultflow.storage.errors import IntegrityError, NotARepository, VaultflowError
from vaultflow.tasks import settings


def _prefect(verbose: bool) -> Any:
    if not verbose:  # Prefect's log lines would tear the progress bar and repeat our own error message;
        # they all still reach the Prefect API (the UI's run logs)
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "CRITICAL")
    from vaultflow.flows.runtime import PrefectRuntime

    runtime = PrefectRuntime.start()  # imports prefect, which configures logging
    if not verbose:  # "Still processing items" at exit: this logger bypasses the console handler's level
        logging.getLogger("prefect.EventsWorker").setLevel(logging.ERROR)
        # When the API goes away, its log and event senders report each failed send on stderr; the CLI says
        # it once, in its own words (see _run), and the UI's history is what is incomplete.
        logging.getLogger("prefect._internal.concurrency").setLevel(logging.CRITICAL)
        logging.raiseExceptions = False  # APILogWorker prints "--- Error logging to API ---" unless this is off
    return runtime


def _open_first(s: settings.RepoSettings) -> Any:
    """Open the repository before any flow run or progress display exists: the password prompt is not hidden
    behind a progress bar, and a typo (wrong password, no repository there) is refused without a Failed run
    that would page someone. The embedded default repository is created on first use; one the user named
    never is. The open repository is handed to the flow, so the key is derived once."""
    from vaultflow.storage.repository import Repository
    from vaultflow.tasks import context

    prompted = not (s.password_file or os.environ.get("VAULTFLOW_PASSWORD") or s.password_secret)
    password = s.password()
    if prompted:  # tasks that resolve the password again must not prompt behind the progress bar
        os.environ["VAULTFLOW_PASSWORD"] = password  # worker processes of this run inherit it, nothing else
    elif s.password_file:  # --password-file: worker processes read the same file
        os.environ["VAULTFLOW_PASSWORD_FILE"] = os.path.abspath(s.password_file)
    try:
        repo = Repository.open(s.url, password, storage_options=s.storage_options)
    except NotARepository:
        if s.url != settings.default_repository():
            raise
        repo = Repository.init(s.url, password, storage_options=s.storage_options)
        print(f"created the default repository {repo.config.id} at {repo.url}", file=sys.stderr)
    context.preopen(repo)
    return repo


def _check_paths(paths: list[str]) -> list[str]:
    """A typo — a local path that does not exist, a URL no source reads, a database that does not answer — is
    refused before the flow run exists, so it pages nobody. Returns the paths as the flow run may carry them: a
    password typed into a URL has moved into this process's environment (tasks.sources.base.split_password)."""
    from vaultflow.tasks import sources

    src = sources.for_paths(paths)
    src.check()
    return src.shown_paths


def _run(runtime: Any, label: str, flow_name: str, **params: Any) -> Any:
    """Run a flow with a rich progress bar on stderr; print the timings line when asked."""
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    from vaultflow.tasks import progress

    flow = getattr(__import__(f"vaultflow.flows.{flow_name}", fromlist=[flow_name]), flow_name)
    console = Console(stderr=True)
    bar = Progress(TextColumn(f"[bold]{label}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                   TextColumn("{task.fields[files]}"), TimeRemainingColumn(), console=console,
                   disable=not console.is_terminal, transient=True)
    task_id = bar.add_task(label, total=None, files="")
    progress.set_listener(lambda done, total, files, nfiles: bar.update(
        task_id, completed=done, total=total or None, files=f"{files:,}/{nfiles:,} files" if files else ""))
    try:
        with bar:
            return runtime.run_flow(flow, **params)
    except VaultflowError:
        raise
    except Exception as e:
        if runtime.api_alive():
            raise
        raise OrchestratorLost(f"the Prefect API at {runtime.api_url} stopped answering during the {label} "
                               f"({type(e).__name__}); its run history is incomplete") from None
    finally:
        progress.set_listener(None)
        if _timings():
            print(runtime.timings.format(), file=sys.stderr)


class OrchestratorLost(VaultflowError):
    """The Prefect API went away mid-run: the repository, not the API, says what was committed."""


def _committed_since(repo: Any, started: str, paths: list[str]) -> Any:
    """The snapshot record this machine committed for `paths` since `started`, if any (the API is gone, so the
    repository, the source of truth, is asked)."""
    import socket

    from vaultflow.tasks import sources

    shown = sources.for_paths(paths).shown_paths  # as the record keeps them
    mine = [(rid, r) for rid, r in repo.snapshots().items()
            if r.started >= started and r.host == socket.gethostname() and r.paths == shown]
    return max(mine, key=lambda item: item[1].started, default=None)


def _print_rows(rows: list[dict[str, str]]) -> None:
    width = max(len(r["measure"]) for r in rows)
    for row in rows:
        print(f"{row['measure']:>{width}}: {row['value']}")


def _runner(args: argparse.Namespace) -> dict[str, Any]:
    """`task_runner=` for the flow call, only when the command line has the option (`--task-runner`)."""
    spec = getattr(args, "task_runner", None)
    return {} if spec is None else {"task_runner": spec}


def _via_agent(args: argparse.Namespace) -> int | None:
    """Hand the command to the vaultflow agent (a warm process that forks a child per command, see agent.py);
    its exit status, or None to run it here. The password prompt, if one is needed, stays in this process."""
    from vaultflow import agent

    if not agent.enabled():
        return None
    s = settings.resolve(args.repo, args.password_file, args.password_secret)

    def prompt_here() -> None:
        if not (s.password_file or os.environ.get("VAULTFLOW_PASSWORD") or s.password_secret) and sys.stdin.isatty():
            os.environ["VAULTFLOW_PASSWORD"] = s.password()  # sent to the child over the 0600 socket, never stored

    from vaultflow.storage.snapshot import utc_now

    started = utc_now()
    try:
        rc = agent.run_command(args, prompt_here)
        if rc is not None and _timings():  # the child's share is not in this process tree's rusage
            print(" ".join(f"agent_{k}={v:.3f}" if isinstance(v, float) and k == "cpu_seconds" else f"agent_{k}={v:.0f}"
                           for k, v in agent.last_usage().items()), file=sys.stderr)
        return rc
    except agent.AgentLost as e:
        if args.command != "backup":
            raise VaultflowError(e.what) from None
        return _backup_lost(s, e.what, started, args.paths)


def _backup_lost(s: settings.RepoSettings, what: str, started: str, paths: list[str]) -> int:
    """The process running a backup ended without an exit status: the repository says what was committed."""
    from vaultflow.storage.repository import Repository

    return _report_committed(Repository.open(s.url, s.password(), storage_options=s.storage_options), what,
                             started, paths)


def _report_committed(repo: Any, what: str, started: str, paths: list[str]) -> int:
    """After the run's process or orchestrator was lost (`what`): one line saying whether a snapshot of `paths`
    was committed since `started`; the exit status (0 committed and complete, 1 nothing committed)."""
    committed = _committed_since(repo, started, paths)
    if committed is None:
        print(f"vaultflow: error: {what}; nothing was committed (the next backup adopts what was uploaded)",
              file=sys.stderr)
        return 1
    rid, record = committed
    print(f"vaultflow: warning: {what}; snapshot {record.source} #{record.serial} ({rid[:12]}) was committed "
          "and is complete", file=sys.stderr)
    return 0


def _direct(fn: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run the command in this process. In the CLI process itself, the process then ends right after Prefect's
    own at-exit drain of its log and event senders: the interpreter's teardown of ~1,400 modules would cost
    ~0.55 s (docs/startup.md). The status is the one `vaultflow.cli.main` returns for the outcome."""
    from vaultflow import agent

    fast = agent.cli_process()
    code = 1  # an unexpected exception: the interpreter prints it and exits 1
    try:
        code = fn(args)
        return code
    except VaultflowError:
        raise
    except KeyboardInterrupt:
        code = 130
        raise
    except BrokenPipeError:
        code = 0
        raise
    finally:
        if fast:
            atexit.register(_fast_exit, code)


def _fast_exit(code: int) -> None:
    from vaultflow.flows.runtime import drain_prefect

    drain_prefect()  # normally a no-op: threading's shutdown already ran Prefect's own drain
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def cmd_backup(args: argparse.Namespace) -> int:
    if args.stdin_from_command:
        from vaultflow.tasks.sources.command import command_path

        if args.paths:
            raise VaultflowError("--stdin-from-command backs up the command's output alone; give no paths as well")
        # the stream's name travels in the path, the one thing that reaches capture, workers and the record
        args.paths = [command_path(args.stdin_from_command, args.stdin_filename)]
        args.stdin_from_command = args.stdin_filename = None  # converted once (an agent child parses again)
    elif args.stdin_filename:
        raise VaultflowError("--stdin-filename names the stream of --stdin-from-command; give that too")
    if not args.paths:
        raise VaultflowError("nothing to back up: name paths, a source URL or --stdin-from-command COMMAND")
    rc = _via_agent(args)
    return rc if rc is not None else _direct(_backup, args)


def _backup(args: argparse.Namespace) -> int:
    s = settings.resolve(args.repo, args.password_file, args.password_secret)
    paths = _check_paths(args.paths)
    runtime = _prefect(args.verbose)  # before anything imports prefect (a Secret block password does)
    repo = _open_first(s)
    from vaultflow.flows.backup import ErrorBudgetExceeded
    from vaultflow.storage.snapshot import utc_now

    started = utc_now()
    try:
        summary = _run(runtime, "backup", "backup", paths=paths, source=args.source, repository=s.url,
                       full=args.full, excludes=args.exclude, error_budget=args.error_budget,
                       verify_sample=args.verify_sample, password_secret=s.password_secret,
                       lock_wait=args.retry_lock, **_runner(args))
    except ErrorBudgetExceeded as e:
        print(f"vaultflow: error: {e}", file=sys.stderr)
        return 3
    except OrchestratorLost as e:
        return _report_committed(repo, str(e), started, paths)
    _print_rows(summary.rows())
    if summary.errors:
        print(f"{summary.errors} files could not be read completely; see `vaultflow ls {summary.snapshot[:12]} -l`"
              " or tables/errors in the repository", file=sys.stderr)
        return 3
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    if args.target == "-":  # bytes to stdout: this process's stdout, so neither the agent nor a flow run
        return _dump(args)
    rc = _via_agent(args)
    return rc if rc is not None else _direct(_restore, args)


def _restore(args: argparse.Namespace) -> int:
    if args.to_database:
        return _restore_database(args)
    if args.target is None:
        raise VaultflowError("name a folder to restore into, `-` with --stream NAME for stdout, or "
                             "--to-database URL")
    s = settings.resolve(args.repo, args.password_file, args.password_secret)
    if os.path.lexists(args.target) and not os.path.isdir(args.target):
        raise VaultflowError(f"cannot restore into {args.target}: it exists and is not a directory; name a new or "
                             "existing folder")
    runtime = _prefect(args.verbose)
    _open_first(s).find_snapshot(args.snapshot)  # an unknown snapshot is a typo, not a failed run
    summary = _run(runtime, "restore", "restore", snapshot=args.snapshot, target=args.target,
                   includes=[*args.include, *args.stream],
                   overwrite=args.overwrite, repository=s.url, password_secret=s.password_secret, **_runner(args))
    _print_rows(summary.rows())
    for path, why in summary.skipped.items():
        print(f"note: {path}: {why}", file=sys.stderr)
    return 0


def _restore_database(args: argparse.Namespace) -> int:
    from vaultflow.tasks import sources

    if args.target is not None:
        raise VaultflowError("--to-database restores into the database it names; give no folder as well")
    s = settings.resolve(args.repo, args.password_file, args.password_secret)
    # A typo'd URL is refused here, before any flow run; a password typed into it moves into this process's
    # environment, and the flow run's parameter is the URL without it.
    database = sources.for_paths([args.to_database]).url
    runtime = _prefect(args.verbose)
    _open_first(s).find_snapshot(args.snapshot)
    summary = _run(runtime, "restore", "restore_database", snapshot=args.snapshot, database=database,
                   streams=args.stream, jobs=args.jobs, repository=s.url, password_secret=s.password_secret)
    _print_rows(summary.rows())
    return 0


def _dump(args: argparse.Namespace) -> int:
    """`restore SNAPSHOT --stream NAME -`: one entry's bytes to stdout, every chunk and the whole verified."""
    from vaultflow.storage import dump
    from vaultflow.storage.repository import Repository

    if len(args.stream) != 1 or args.to_database:
        raise VaultflowError("`-` writes one stream to stdout: name it with exactly one --stream NAME")
    s = settings.resolve(args.repo, args.password_file, args.password_secret)
    repo = Repository.open(s.url, s.password(), storage_options=s.storage_options)
    _, record = repo.find_snapshot(args.snapshot)
    row = dump.find_entry(repo.files_table(record), args.stream[0])
    out = sys.stdout.buffer
    dump.write_entry(repo, row, out)
    out.flush()
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    rc = _via_agent(args)
    return rc if rc is not None else _direct(_check, args)


def _check(args: argparse.Namespace) -> int:
    import json

    s = settings.resolve(args.repo, args.password_file, args.password_secret)
    runtime = _prefect(args.verbose)  # before anything imports prefect
    try:
        _open_first(s)
    except IntegrityError as e:  # a damaged config or key files: the check's own answer, in its own format
        if not args.json:
            raise
        print(json.dumps({"ok": False, "problems": [{"kind": "open", "object": e.obj, "message": str(e),
                                                     "snapshots": [], "files": []}], "notices": []}, indent=1))
        return 1
    from vaultflow.flows.check import CheckFailed

    try:
        report = _run(runtime, "check", "check", read_data=args.read_data, read_data_subset=args.read_data_subset,
                      repository=s.url, password_secret=s.password_secret, **_runner(args))
    except CheckFailed as e:
        report = e.report
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(f"{report['snapshots']} snapshots, {report['index_files']} index files, {report['packs']} packs, "
              f"{report['chunks']} chunks; {report['packs_read']} packs read")
        for p in report["problems"]:
            text = p["message"] if p["message"].startswith(p["object"]) else f"{p['object']}: {p['message']}"
            print(f"PROBLEM {p['kind']}: {text}")
            if p["snapshots"]:
                print(f"  affects snapshots: {', '.join(x[:12] for x in p['snapshots'])}")
            for f in p["files"]:
                print(f"  affects {f}")
        for p in report.get("notices", []):
            print(f"notice {p['kind']}: {p['object']}: {p['message']}")
        print("no problems found" if report["ok"] else f"{len(report['problems'])} problems found")
    return 0 if report["ok"] else 1


def cmd_restore_test(args: argparse.Namespace) -> int:
    rc = _via_agent(args)
    return rc if rc is not None else _direct(_restore_test, args)


def _restore_test(args: argparse.Namespace) -> int:
    s = settings.resolve(args.repo, args.password_file, args.password_secret)
    runtime = _prefect(args.verbose)  # before anything imports prefect
    _open_first(s)
    from vaultflow.flows.restore_test import RestoreTestFailed

    try:
        result = _run(runtime, "restore test", "restore_test", sample=args.sample, everything=args.all,
                      snapshot=args.snapshot, repository=s.url, password_secret=s.password_secret,
                      **_runner(args))
    except RestoreTestFailed as e:
        print(f"vaultflow: restore test FAILED: {e}", file=sys.stderr)
        return 1
    checks = result.files
    compared = sum(c.compared_with_source for c in checks)
    print(f"restore test passed: {len(checks)} files, {sum(c.bytes for c in checks):,} bytes restored and "
          f"verified by hash; {compared} also compared byte for byte with the source")
    if result.tables:
        streams = len({(t.snapshot, t.stream) for t in result.tables})
        print(f"  and {streams} database dumps loaded into scratch databases: {len(result.tables)} tables, "
              f"{sum(t.recorded for t in result.tables):,} rows, every count as recorded at backup time")
    return 0


def _timings() -> bool:
    from vaultflow.flows.runtime import timings_requested

    return timings_requested()


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    b = sub.add_parser("backup", parents=[common], help="back up a file tree as a new snapshot (a Prefect flow run)")
    b.add_argument("paths", nargs="*", metavar="PATH",
                   help="directories and files to back up (several: stored relative to their common folder), or "
                        "one URL of a source: s3://…, postgresql://user@host/db, mariadb://…, sqlite:///path.db")
    b.add_argument("--stdin-from-command", metavar="COMMAND",
                   help="back up the standard output of COMMAND (split like a shell would, never run by one) as "
                        "one stream; a non-zero exit fails the snapshot. Its arguments are recorded in the snapshot: "
                        "pass secrets through the environment")
    b.add_argument("--stdin-filename", metavar="NAME",
                   help="the stream's name in the snapshot (default: stdin)")
    b.add_argument("--source", help="source name (default: derived from the absolute path)")
    b.add_argument("--full", action="store_true", help="re-read every file instead of trusting unchanged metadata")
    b.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                   help="skip paths or names matching GLOB (repeatable)")
    b.add_argument("--error-budget", type=int, default=100,
                   help="fail the run when more files than this cannot be read (default 100)")
    b.add_argument("--verify-sample", type=int, default=8, help="chunks to read back after commit (default 8)")
    b.add_argument("--retry-lock", type=float, default=0.0, metavar="SECONDS",
                   help="wait up to SECONDS for another backup of the same source to finish (default: fail at once)")
    b.add_argument("--verbose", "-v", action="store_true", help="show Prefect's log lines")
    b.set_defaults(func=cmd_backup)

    r = sub.add_parser("restore", parents=[common], help="restore a snapshot into a folder, verifying every byte")
    r.add_argument("snapshot", help="id prefix, 'latest', SOURCE:latest or SOURCE:SERIAL")
    r.add_argument("target", nargs="?", help="folder to restore into (must be empty unless --overwrite), or `-` "
                   "to write the one --stream to stdout")
    r.add_argument("--include", action="append", default=[], metavar="PATH",
                   help="restore only this path and what is below it (repeatable)")
    r.add_argument("--stream", action="append", default=[], metavar="NAME",
                   help="a stream of the snapshot (a dump: see `vaultflow ls SNAPSHOT`); with `-` it goes to "
                        "stdout, with --to-database only it is loaded (repeatable)")
    r.add_argument("--to-database", metavar="URL",
                   help="load a database source's snapshot into the database URL names (postgresql://…, "
                        "mariadb://…, sqlite:///…); it must be new or empty")
    r.add_argument("--jobs", type=int, default=2, help="parallel jobs of the database's loader (default 2)")
    r.add_argument("--overwrite", action="store_true", help="replace files that exist in the target")
    r.add_argument("--verbose", "-v", action="store_true", help="show Prefect's log lines")
    r.set_defaults(func=cmd_restore)

    t = sub.add_parser("restore-test", parents=[common],
                       help="restore a sample of each source's latest snapshot into scratch and prove it")
    amount = t.add_mutually_exclusive_group()
    amount.add_argument("--sample", type=int, default=20, help="files per snapshot (default 20)")
    amount.add_argument("--all", action="store_true", help="every file")
    t.add_argument("--snapshot", help="test this snapshot instead of each source's latest")
    t.add_argument("--verbose", "-v", action="store_true", help="show Prefect's log lines")
    t.set_defaults(func=cmd_restore_test)

    c = sub.add_parser("check", parents=[common], help="verify the repository's structure and, on demand, its bytes")
    data = c.add_mutually_exclusive_group()
    data.add_argument("--read-data", action="store_true", help="read and authenticate every pack")
    data.add_argument("--read-data-subset", metavar="N%|K/N",
                      help="read a random N%% of the packs, or slice K of N (N runs cover everything)")
    c.add_argument("--json", action="store_true", help="print the report as JSON")
    c.add_argument("--verbose", "-v", action="store_true", help="show Prefect's log lines")
    c.set_defaults(func=cmd_check)
