"""The prune flow and `vaultflow prune`: on both backends, a dry run, both phases with the plan as an artifact,
the exclusive lock (waiting, then naming the holder), and `forget --prune`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request

from prune_helpers import (
    assert_check_passes,
    assert_restores,
    blobs,
    commit,
    local,
    new_repo,
    objects,
    packs,
    store,
    with_one_forgotten_pack,
)

from vaultflow.storage import maintenance

CLI = ("import sys\nfrom vaultflow import cli, prune, run\n"
       "sub = next(a for a in cli.build_parser()._actions if isinstance(getattr(a, 'choices', None), dict))\n"
       "if 'prune' not in sub.choices:  # until cli.py registers it\n"
       "    add = run.add_parsers\n    run.add_parsers = lambda s, c: (add(s, c), prune.add_parser(s, c))\n"
       "sys.exit(cli.main(sys.argv[1:]))")


def vaultflow_prune(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", CLI, "prune", *args], env=env, capture_output=True, text=True,
                          timeout=300, stdin=subprocess.DEVNULL)


def cli_env(repo, api: str) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return {**os.environ, "VAULTFLOW_REPOSITORY": repo.url, "VAULTFLOW_PASSWORD": "pw", "PREFECT_API_URL": api}


def artifact_rows(api: str, key: str) -> list[dict[str, str]]:
    body = json.dumps({"artifacts": {"key": {"any_": [key]}}, "sort": "CREATED_DESC", "limit": 1}).encode()
    req = urllib.request.Request(f"{api}/artifacts/filter", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        [found] = json.load(resp)
    return json.loads(found["data"]) if isinstance(found["data"], str) else found["data"]


def test_the_prune_flow_frees_data_on_both_backends(location, prefect_server, monkeypatch):
    from vaultflow.flows.prune import prune as prune_flow
    from vaultflow.flows.runtime import run_flow

    monkeypatch.setenv("VAULTFLOW_PASSWORD", "pw")
    monkeypatch.setenv("VAULTFLOW_STORAGE_OPTIONS", json.dumps(location.storage_options))
    repo = new_repo(location)
    p_old, expected = with_one_forgotten_pack(repo)
    first = run_flow(prune_flow, repository=repo.url)
    assert (first.packs_marked, first.packs_deleted, first.packs_kept) == (1, 0, 1) and p_old in packs(repo)
    second = run_flow(prune_flow, repository=repo.url, grace="0s")
    assert (second.packs_deleted, second.bytes_freed) == (1, first.bytes_marked) and p_old not in packs(repo)
    assert not list(repo.backend.list("locks"))
    assert_check_passes(repo)
    assert_restores(repo, expected)


def test_cli_prune_dry_run_then_two_phases_with_the_plan_as_an_artifact(prefect_server, tmp_path):
    repo = local(tmp_path)
    p_old, expected = with_one_forgotten_pack(repo)
    env = cli_env(repo, prefect_server)
    before = objects(repo)
    size = repo.backend.size(p_old)
    dry = vaultflow_prune(["--dry-run"], env)
    assert dry.returncode == 0, dry.stderr
    assert "dry run: nothing was changed" in dry.stdout
    assert f"would free 0 bytes now, and {size:,} more after the grace period" in dry.stdout
    assert objects(repo) == before
    assert artifact_rows(prefect_server, "prune-summary")[4]["value"].startswith("1 (")  # marked, as planned

    marked = vaultflow_prune([], env)
    assert marked.returncode == 0, marked.stderr
    assert "packs marked as deletion candidates (unused or repacked): 1 (" in marked.stdout
    freed = vaultflow_prune(["--grace", "0"], env)
    assert freed.returncode == 0 and "candidates past the grace period, deleted: 1 (" in freed.stdout, freed.stderr
    assert p_old not in packs(repo)
    assert artifact_rows(prefect_server, "prune-summary")[6]["value"].startswith("1 (")
    assert_restores(repo, expected)

    typo = vaultflow_prune(["--grace", "soon"], env)
    assert typo.returncode == 1 and "duration 'soon'" in typo.stderr


def test_prune_waits_for_the_lock_then_fails_naming_the_holder(prefect_server, tmp_path):
    repo = local(tmp_path)
    with_one_forgotten_pack(repo)
    env = cli_env(repo, prefect_server)
    before = objects(repo)
    with repo.lock(purpose="backup of home", scope="source:home"):  # a backup running right now
        started = time.monotonic()
        locked = vaultflow_prune(["--retry-lock", "2"], env)
        waited = time.monotonic() - started
        assert locked.returncode == 1
        assert "is locked: a shared lock" in locked.stderr and "for 'backup of home'" in locked.stderr
        assert f"held by pid {os.getpid()}" in locked.stderr and waited >= 2
        assert objects(repo) == before
        dry = vaultflow_prune(["--dry-run"], env)  # a plan shares the repository with backups
        assert dry.returncode == 0, dry.stderr


def test_forget_with_prune_marks_what_the_forget_released(prefect_server, tmp_path):
    repo = local(tmp_path)
    gone, kept = blobs(1), blobs(1)
    p_gone = store(repo, gone)
    commit(repo, "home", {"g": gone})
    store(repo, kept)
    s_kept = commit(repo, "home", {"k": kept})
    out = subprocess.run([sys.executable, "-m", "vaultflow", "forget", "--keep-last", "1", "--prune"],
                         env={**cli_env(repo, prefect_server), "VAULTFLOW_AGENT": "0"}, capture_output=True,
                         text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stderr
    assert "packs marked as deletion candidates (unused or repacked): 1 (" in out.stdout
    assert maintenance.deletion_candidates(repo).keys() == {p_gone}
    assert_restores(repo, {s_kept: {"k": kept}})
