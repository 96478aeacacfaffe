"""`vaultflow serve [CONFIG]`: register the config's deployments, alarms and retention limit on the Prefect API the
CLI starts or reuses, then serve the deployments from this process until SIGTERM (deployments/)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from vaultflow.storage.errors import VaultflowError
from vaultflow.tasks import settings


def default_config() -> str:
    return str(settings.vaultflow_home() / "serve.toml")


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("serve", parents=[common], help="run the schedules of a config file (backups per source, "
                       "verification, restore tests, retention, audit) from this machine, with failure and RPO "
                       "alarms to webhooks; see deployments/example.toml")
    p.add_argument("config", nargs="?", default=None, metavar="CONFIG",
                   help=f"the TOML config (default {default_config()})")
    p.add_argument("--register-only", action="store_true",
                   help="create or update the deployments, alarms and concurrency limit, print them and exit; "
                        "scheduled runs then wait for a `vaultflow serve`")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    from vaultflow.deployments import config

    if args.repo:
        raise VaultflowError("serve takes the repository from its config file ([repository] url); drop --repo")
    cfg = config.load(args.config or default_config())  # a typo is refused before Prefect is started or imported
    from vaultflow.flows.runtime import PrefectRuntime

    runtime = PrefectRuntime.start()  # sets PREFECT_API_URL before anything imports prefect
    from vaultflow import run

    s = settings.resolve(cfg.repository.url, args.password_file or cfg.repository.password_file,
                         args.password_secret or cfg.repository.password_secret)
    repo = run._open_first(s)  # a wrong password or a missing repository stops here, before any schedule exists;
    # a password given by prompt or file reaches the served runs through this process's environment

    from prefect.settings import get_current_settings

    from vaultflow.deployments import alarms, serve
    from vaultflow.tasks import context

    context.take_preopened(s.url)  # served runs are subprocesses that open it themselves
    _warn_sources(cfg)
    repo_id, label = repo.config.id, cfg.repository.name or repo.config.id
    deployments = serve.build(cfg, repo_id, s.password_secret)  # a schedule Prefect refuses stops here too
    serve.refuse_takeover(deployments, cfg.repository.url)
    limit = serve.ensure_retention_limit(repo_id) if cfg.retention is not None else None
    names = alarms.install(cfg, repo_id, alarms.ui_base(cfg, runtime.api_url),
                           get_current_settings().flows.heartbeat_frequency)
    print(f"repository {label} ({repo_id}) at {settings.redact(s.url)}; Prefect API {runtime.api_url}")
    print(f"alarms: {', '.join(names) or 'none (no [[notify.webhooks]])'}")
    if limit:
        print(f"retention runs one at a time: global concurrency limit {limit}")
    if args.register_only:
        serve.register(deployments)
    for d in deployments:
        print(f"{'registered' if args.register_only else 'serving'} {d.deployment.flow_name}/{d.deployment.name}")
    sys.stdout.flush()
    if not args.register_only:
        serve.serve_forever(deployments)
    return 0


def _warn_sources(cfg: Any) -> None:
    """A source that fails its typo check now (a missing path, an unknown URL scheme) would fail every scheduled
    run: say so at start. A warning, not a refusal: a share mounted later must not stop the other sources."""
    from vaultflow.tasks import sources

    for s in cfg.sources:
        try:
            sources.for_paths(s.paths).check()
        except VaultflowError as e:
            print(f"vaultflow: warning: source {s.name}: {e}; its backups fail until that is fixed", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """`vaultflow serve` on its own (`python -c "from vaultflow.serve import main; main([...])"`)."""
    parser = argparse.ArgumentParser(prog="vaultflow")
    common = argparse.ArgumentParser(add_help=False)
    for flag in ("--repo", "--password-file", "--password-secret"):
        common.add_argument(flag)
    add_parser(parser.add_subparsers(dest="command", required=True), common)
    args = parser.parse_args(["serve", *(argv or [])])
    try:
        return int(args.func(args))
    except VaultflowError as e:
        print(f"vaultflow: error: {e}", file=sys.stderr)
        return 1
