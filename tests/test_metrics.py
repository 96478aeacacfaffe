"""`vaultflow metrics`: OpenMetrics text that both Prometheus parsers accept, whose values are those of a repository
built by real backups; and the pack verification state (tasks/verified.py) that its coverage comes from."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import FAST_KDF
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families

from vaultflow import metrics
from vaultflow.storage.checker import Checker
from vaultflow.storage.errors import IntegrityError, VaultflowError
from vaultflow.storage.repository import Repository
from vaultflow.storage.snapshot import parse_utc
from vaultflow.tasks import verified

DAY = 86400.0
REPO_ID = "0123456789abcdef0123456789abcdef"


def parse(text: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """{family: {sorted labels: value}}, parsed by the Prometheus text parser; the OpenMetrics parser (strict:
    # EOF, escaping, one block per family) must agree."""
    assert text.endswith("# EOF\n")
    out = {f.name: {tuple(sorted(s.labels.items())): s.value for s in f.samples}
           for f in text_string_to_metric_families(text)}
    strict = {f.name: {tuple(sorted(s.labels.items())): s.value for s in f.samples}
              for f in openmetrics_families(text)}
    assert strict == out
    for name in out:
        assert name.startswith("vaultflow_") and f"# HELP {name} " in text and f"# TYPE {name} gauge\n" in text
    return out


def cli_args(*argv: str) -> argparse.Namespace:
    """Parse as `vaultflow metrics …` will once cli.py hooks metrics.add_parser in."""
    parser = argparse.ArgumentParser(prog="vaultflow")
    common = argparse.ArgumentParser(add_help=False)
    for flag in ("--repo", "--password-file", "--password-secret"):
        common.add_argument(flag)
    metrics.add_parser(parser.add_subparsers(dest="command"), common)
    return parser.parse_args(["metrics", *argv])


def test_verification_state_only_moves_forward_and_forgets_pruned_packs():
    assert verified.load_verified(REPO_ID) == {}  # no file: nothing verified here, not an error
    assert verified.record_verified(REPO_ID, ["data/aa/p1", "data/bb/p2"], 1000.0) == 2
    verified.record_verified(REPO_ID, ["data/aa/p1"], 500.0)  # an older run finishing late changes nothing
    verified.record_verified(REPO_ID, ["data/cc/p3"], 1000.0 + DAY)
    assert verified.load_verified(REPO_ID) == {"data/aa/p1": 1000.0, "data/bb/p2": 1000.0, "data/cc/p3": 1000.0 + DAY}
    verified.record_verified(REPO_ID, [], 5.0, present=["data/aa/p1", "data/cc/p3"])  # p2 was pruned
    assert verified.load_verified(REPO_ID) == {"data/aa/p1": 1000.0, "data/cc/p3": 1000.0 + DAY}
    cover = verified.coverage(verified.load_verified(REPO_ID), ["data/aa/p1", "data/cc/p3", "data/dd/p4"],
                              now=1000.0 + 1.5 * DAY, days=1)
    assert (cover.packs, cover.verified, cover.never, cover.oldest) == (3, 1, 1, 1000.0)
    assert cover.ratio == pytest.approx(1 / 3)
    assert verified.coverage({}, [], now=0.0, days=1).ratio == 1.0  # nothing stored: nothing left unverified


def test_a_damaged_verification_state_is_reported_not_trusted():
    path = verified.state_path(REPO_ID)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"vaultflow_verified": 1, "repository": "f" * 32, "packs": {"data/x": 1}}))
    with pytest.raises(IntegrityError, match="damaged.*wrong version or repository"):
        verified.load_verified(REPO_ID)
    path.write_text("{not json")
    with pytest.raises(IntegrityError, match="pack verification state is damaged"):
        verified.record_verified(REPO_ID, ["data/x"])
    with pytest.raises(VaultflowError, match="not a hex id"):
        verified.state_path("../../etc")


def test_an_empty_repository_exports_every_family_and_escapes_its_url(tmp_path, monkeypatch):
    url = str(tmp_path / 'odd "repo" \\ name')
    Repository.init(url, "pw", kdf=FAST_KDF)
    monkeypatch.setenv("VAULTFLOW_PASSWORD", "pw")
    out = tmp_path / "vaultflow.prom"
    assert metrics.cmd_metrics(cli_args("--repo", url, "--output", str(out))) == 0
    text = out.read_text()
    assert oct(out.stat().st_mode & 0o777) == "0o644" and not list(tmp_path.glob(".vaultflow.prom.*"))
    found = parse(text)
    label = (("repository", url),)  # quotes and backslashes came back exactly
    assert found["vaultflow_repository_packs"] == {label: 0.0}
    assert found["vaultflow_repository_snapshots"] == {label: 0.0}
    assert found["vaultflow_verification_coverage_ratio"] == {label: 1.0}
    assert found["vaultflow_last_success_timestamp_seconds"] == {}  # described, no source yet
    assert found["vaultflow_verification_oldest_timestamp_seconds"] == {}  # no pack was ever verified


def test_metrics_never_import_prefect(tmp_path):
    url = str(tmp_path / "repo")
    Repository.init(url, "pw", kdf=FAST_KDF)
    code = ("import sys, argparse\nfrom vaultflow import metrics\n"
            "p = argparse.ArgumentParser(); c = argparse.ArgumentParser(add_help=False)\n"
            "[c.add_argument(f) for f in ('--repo', '--password-file', '--password-secret')]\n"
            "metrics.add_parser(p.add_subparsers(), c)\n"
            f"a = p.parse_args(['metrics', '--repo', {url!r}])\n"
            "assert a.func(a) == 0\n"
            "assert not [m for m in sys.modules if m.split('.')[0] == 'prefect'], 'prefect was imported'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "VAULTFLOW_PASSWORD": "pw"})
    assert done.returncode == 0, done.stderr
    assert "vaultflow_repository_packs" in done.stdout


def _write_tree(root: Path, files: dict[str, int]) -> None:
    for name, size in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(os.urandom(size))


def test_metrics_match_a_repository_of_two_sources(prefect_server, tmp_path, monkeypatch):
    from vaultflow.flows.backup import backup
    from vaultflow.flows.runtime import run_flow

    monkeypatch.setenv("VAULTFLOW_PASSWORD", "pw")
    repo = Repository.init(str(tmp_path / "repo"), "pw", kdf=FAST_KDF)
    alpha, beta = tmp_path / "alpha", tmp_path / "beta"
    _write_tree(alpha, {"a.bin": 200_000, "sub/b.bin": 50_000})
    _write_tree(beta, {"c.bin": 30_000})
    summaries = {"alpha": [run_flow(backup, paths=[str(alpha)], source="alpha", repository=repo.url)]}
    for extra in ("d.bin", "e.bin"):
        _write_tree(alpha, {extra: 70_000})
        summaries["alpha"].append(run_flow(backup, paths=[str(alpha)], source="alpha", repository=repo.url))
    summaries["beta"] = [run_flow(backup, paths=[str(beta)], source="beta", repository=repo.url)]

    repo = Repository.open(repo.url, "pw")
    records = repo.snapshots()
    packs = sorted(p.relative_to(tmp_path / "repo").as_posix() for p in (tmp_path / "repo" / "data").rglob("*")
                   if p.is_file())
    assert len(packs) >= 4  # every backup added new random data
    # check read every pack but one (damaged on purpose): only those it authenticated count as verified
    checker = Checker(repo)
    checker.structure()
    bad = packs[0]
    raw = bytearray((tmp_path / "repo" / bad).read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (tmp_path / "repo" / bad).write_bytes(bytes(raw))
    checker.read_packs(packs[:3])
    assert verified.record_check(checker, [packs[:2], packs[2:3]], when=time.time() - 2 * DAY) == 2
    verified.record_verified(repo.config.id, [packs[3]], time.time() - 40 * DAY)  # outside a 30-day window

    now = time.time()
    found = parse(metrics.exposition(repo, now, 30))
    base = (("repository", repo.url),)
    for source, runs in summaries.items():
        labels = (("repository", repo.url), ("source", source))
        rid, last = repo.latest(source, records) or ("", None)
        assert last is not None and rid == runs[-1].snapshot
        finished = parse_utc(last.finished).timestamp()

        def value(name: str, labels: tuple[tuple[str, str], ...] = labels) -> float:
            return found[f"vaultflow_{name}"][labels]

        assert value("last_success_timestamp_seconds") == pytest.approx(finished, abs=1e-6)
        assert value("last_success_age_seconds") == pytest.approx(now - finished, abs=1e-3)
        assert value("source_snapshots") == len(runs)
        assert value("last_snapshot_serial") == runs[-1].serial == len(runs)
        assert value("last_snapshot_bytes") == runs[-1].bytes
        assert value("last_snapshot_files") == runs[-1].files
        assert value("last_snapshot_errors") == runs[-1].errors == 0
        assert value("last_snapshot_added_bytes") == runs[-1].bytes_added > 0
        assert value("last_snapshot_duration_seconds") == pytest.approx(
            finished - parse_utc(last.started).timestamp(), abs=1e-6)
    assert found["vaultflow_last_snapshot_files"][(*base, ("source", "alpha"))] == 4
    assert found["vaultflow_repository_packs"][base] == len(packs)
    assert found["vaultflow_repository_stored_bytes"][base] == sum((tmp_path / "repo" / p).stat().st_size
                                                                   for p in packs)
    assert found["vaultflow_repository_snapshots"][base] == 4
    assert found["vaultflow_repository_sources"][base] == 2
    assert found["vaultflow_repository_damaged_records"][base] == 0
    assert found["vaultflow_verification_verified_packs"][base] == 2
    assert found["vaultflow_verification_never_verified_packs"][base] == len(packs) - 3  # the damaged one too
    assert found["vaultflow_verification_coverage_ratio"][base] == pytest.approx(2 / len(packs))
    assert found["vaultflow_verification_oldest_timestamp_seconds"][base] == pytest.approx(now - 40 * DAY, abs=5)

    # a damaged record is counted and skipped; the source's count drops, the other source is untouched
    first = min((rid for rid, r in records.items() if r.source == "alpha"), key=lambda rid: records[rid].serial)
    (tmp_path / "repo" / "snapshots" / first).write_bytes(b'{"record": "garbage"}\n')
    again = parse(metrics.exposition(Repository.open(repo.url, "pw"), now, 30))
    assert again["vaultflow_repository_damaged_records"][base] == 1
    assert again["vaultflow_source_snapshots"][(*base, ("source", "alpha"))] == 2
    assert again["vaultflow_source_snapshots"][(*base, ("source", "beta"))] == 1
