"""`vaultflow audit`: each source against its RPO, chains and witnesses, tombstones, verification coverage, the
restore-test history read back from Prefect's artifacts, key files, and the actions all that calls for."""

from __future__ import annotations

import argparse
import json
import os
import socket
import sqlite3
import time
from contextlib import closing
from pathlib import Path

import pytest
from conftest import FAST_KDF

from vaultflow import audit as audit_cli
from vaultflow.storage.errors import VaultflowError
from vaultflow.storage.repository import Repository
from vaultflow.storage.snapshot import SnapshotRecord
from vaultflow.tasks import verified
from vaultflow.tasks.audit import (
    AuditReport,
    ChainAudit,
    CoverageAudit,
    KeyFile,
    iso,
    parse_duration,
    parse_rpo,
    source_statuses,
)

DAY = 86400.0


def cli_args(*argv: str) -> argparse.Namespace:
    """Parse as `vaultflow audit …` will once cli.py hooks audit.add_parser in."""
    parser = argparse.ArgumentParser(prog="vaultflow")
    common = argparse.ArgumentParser(add_help=False)
    for flag in ("--repo", "--password-file", "--password-secret"):
        common.add_argument(flag)
    audit_cli.add_parser(parser.add_subparsers(dest="command"), common)
    return parser.parse_args(["audit", *argv])


def test_durations_and_rpo_flags_are_parsed_or_refused():
    assert [parse_duration(t) for t in ("26h", "1d12h", "90m", "1w", "45", "2.5h")] == \
        [93600, 129600, 5400, 604800, 45, 9000]
    assert parse_rpo(["db=26h", "*=2d", " files = 1d12h "]) == {"db": "26h", "*": "2d", "files": "1d12h"}
    for bad in (["db"], ["=26h"], ["db=soon"], ["db=26h3"], ["db=h"]):
        with pytest.raises(VaultflowError, match="SOURCE=DURATION|duration"):
            parse_rpo(bad)


def _record(source: str, serial: int, finished: float, previous: str | None = None) -> SnapshotRecord:
    return SnapshotRecord(source=source, serial=serial, started=iso(finished - 60), finished=iso(finished),
                          host="h", parent=None, previous=previous, manifests={})


def test_a_source_past_its_rpo_and_unverified_packs_become_actions():
    from vaultflow.flows.audit import markdown, recommend

    now = 1_800_000_000.0
    records = {"a" * 64: _record("db", 1, now - 5 * DAY), "b" * 64: _record("db", 2, now - 4 * DAY, "a" * 64),
               "c" * 64: _record("files", 1, now - 3600)}
    statuses = source_statuses(records, {"db": "26h", "retired": "1d"}, now)
    assert [(s.source, s.snapshots, s.last_serial, s.rpo, s.within_rpo) for s in statuses] == [
        ("db", 2, 2, "26h", False), ("files", 1, 1, "26h", True), ("retired", 0, None, "1d", False)]
    report = AuditReport(
        repository="/r", id="0" * 32, generated=iso(now),
        chain=ChainAudit(sources=statuses, chain_problems=[], damaged_records=[], witnesses=[], witness_problems=[],
                         tombstones=[], snapshot_sources={}),
        coverage=CoverageAudit(days=30, packs=40, verified=3, never=37, ratio=3 / 40, oldest=None, state_file="s"),
        restore_tests=[],
        key_files=[KeyFile(id="k", created="", host="", user="", problem=None, opened_this_audit=True)])
    actions = recommend(report, now)
    report.actions = actions
    assert [a.level for a in actions] == ["critical", "critical", "advice", "advice"]
    assert actions[0].message.startswith("source db is 3 days past its RPO of 26h (last success ")
    assert actions[1].message.startswith("source retired has no snapshot (RPO 1d)")
    assert actions[2].message.startswith("37 of 40 packs never verified: run `vaultflow check --read-data-subset "
                                         "K/7` daily")
    assert "one key file opens this repository" in actions[3].message
    assert not report.ok
    text = markdown(report)
    assert "# Audit of /r: ATTENTION" in text and "| db | 2 | 2 |" in text and "PAST RPO" in text


def _tree(root: Path, files: dict[str, int]) -> None:
    for name, size in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(os.urandom(size))


def _sqlite(path: Path) -> None:
    with closing(sqlite3.connect(path)) as conn:
        conn.execute("CREATE TABLE accounts (id INTEGER PRIMARY KEY, name TEXT)")
        conn.execute("CREATE TABLE events (id INTEGER PRIMARY KEY, what TEXT)")
        conn.executemany("INSERT INTO accounts (name) VALUES (?)", [(f"n{i}",) for i in range(5)])
        conn.executemany("INSERT INTO events (what) VALUES (?)", [(f"e{i}",) for i in range(7)])
        conn.commit()


def _artifact(key: str) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        [found] = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    return str(found.data)


def test_audit_answers_an_auditors_questions_about_a_real_repository(prefect_server, tmp_path, monkeypatch, capsys):
    from vaultflow.flows.audit import AuditFailed, audit
    from vaultflow.flows.backup import backup
    from vaultflow.flows.forget import forget
    from vaultflow.flows.restore_test import restore_test
    from vaultflow.flows.runtime import run_flow

    monkeypatch.setenv("VAULTFLOW_PASSWORD", "pw")
    monkeypatch.setenv("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "CRITICAL")  # what the CLI would set, undone
    monkeypatch.setenv("USER", "auditor")  # the key file records who created it
    url = Repository.init(str(tmp_path / "repo"), "pw", kdf=FAST_KDF).url
    alpha, db = tmp_path / "alpha", tmp_path / "app.db"
    _tree(alpha, {"a.bin": 100_000, "sub/b.bin": 20_000})
    for extra in ("c.bin", "d.bin", None):
        run_flow(backup, paths=[str(alpha)], source="alpha", repository=url)
        if extra:
            _tree(alpha, {extra: 10_000})
    _sqlite(db)
    run_flow(backup, paths=[f"sqlite://{db}"], source="beta", repository=url)
    run_flow(forget, keep_last=2, sources=["alpha"], repository=url)
    tested = run_flow(restore_test, everything=True, repository=url)
    repo = Repository.open(url, "pw")
    everything = repo.snapshots(everything=True)
    latest = {s: repo.latest(s) for s in ("alpha", "beta")}
    packs = sorted(name for name, _ in repo.backend.list("data"))
    verified.record_verified(repo.config.id, packs[:1])

    with pytest.raises(AuditFailed) as failed:  # alpha's last success is older than one second
        run_flow(audit, rpo={"alpha": "1s"}, repository=url)
    report = failed.value.report
    alpha_status, beta_status = report.chain.sources
    assert (alpha_status.source, alpha_status.snapshots, alpha_status.last_serial, alpha_status.within_rpo) == \
        ("alpha", 2, 3, False)
    assert alpha_status.last_success == latest["alpha"][1].finished  # type: ignore[index]
    assert (beta_status.source, beta_status.snapshots, beta_status.rpo, beta_status.within_rpo) == \
        ("beta", 1, "26h", True)
    assert report.chain.chain_problems == report.chain.damaged_records == report.chain.witness_problems == []
    assert any(w.startswith("the Prefect API (") for w in report.chain.witnesses)
    [tomb] = report.chain.tombstones
    tomb_id = next(rid for rid, r in everything.items() if r.is_tombstone)
    assert (tomb.source, tomb.serial, tomb.id, tomb.reason, tomb.policy, tomb.removed, tomb.host) == \
        ("alpha", 4, tomb_id, "forget", "keep-last 2", [1], socket.gethostname())
    cov = report.coverage
    assert (cov.packs, cov.verified, cov.never) == (len(packs), 1, len(packs) - 1)
    by_source = {t.source: t for t in report.restore_tests}
    for source, (rid, _) in latest.items():  # type: ignore[misc]
        files = [c for c in tested.files if c.snapshot[:12] == rid[:12]]
        t = by_source[source]
        assert (t.last_run_ok, t.snapshot, t.files) == (True, rid[:12], len(files))
        assert t.bytes == sum(c.bytes for c in files)
        assert t.last_pass == t.last_run is not None
    assert by_source["alpha"].files == 4 and by_source["alpha"].tables == 0
    assert by_source["beta"].tables == len(tested.tables) == 2
    [key] = report.key_files
    assert (key.opened_this_audit, key.host, key.user, key.problem) == (True, socket.gethostname(), "auditor", None)
    assert key.created.startswith(iso(time.time())[:10])
    critical = [a.message for a in report.actions if a.level == "critical"]
    assert len(critical) == 1 and critical[0].startswith("source alpha is ") and "past its RPO of 1s" in critical[0]
    advice = [a.message for a in report.actions if a.level == "advice"]
    assert f"{len(packs) - 1} of {len(packs)} packs never verified" in advice[0] and len(advice) == 2
    text = _artifact(f"audit-{repo.config.id}")
    assert "ATTENTION" in text and "| alpha | 2 | 3 |" in text and "keep-last 2" in text

    # the CLI path: a generous RPO leaves only advice, so the audit passes and prints JSON
    assert audit_cli._audit(cli_args("--repo", url, "--rpo", "*=26h", "--json")) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is True and out["id"] == repo.config.id and len(out["actions"]) == 2
    assert [s["within_rpo"] for s in out["chain"]["sources"]] == [True, True]


def test_audit_fails_on_a_gap_a_damaged_record_and_a_failed_restore_test(prefect_server, tmp_path, monkeypatch,
                                                                         capsys):
    from vaultflow.flows.audit import AuditFailed, audit
    from vaultflow.flows.backup import backup
    from vaultflow.flows.restore_test import RestoreTestFailed, restore_test
    from vaultflow.flows.runtime import run_flow

    monkeypatch.setenv("VAULTFLOW_PASSWORD", "pw")
    monkeypatch.setenv("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "CRITICAL")
    root = tmp_path / "repo"
    url = Repository.init(str(root), "pw", kdf=FAST_KDF).url
    alpha = tmp_path / "alpha"
    _tree(alpha, {"a.bin": 50_000})
    run_flow(backup, paths=[str(alpha)], source="alpha", repository=url)
    _tree(alpha, {"b.bin": 50_000})
    run_flow(backup, paths=[str(alpha)], source="alpha", repository=url)
    passed = run_flow(restore_test, everything=True, repository=url)
    time.sleep(0.01)  # the failing run's artifacts are strictly newer

    repo = Repository.open(url, "pw")
    (first, _), (second, record) = sorted(repo.snapshots().items(), key=lambda kv: kv[1].serial)
    chunk = next(c for c in repo.files_table(record)["chunks"].to_pylist() if c)[0]
    pack, entry = repo.index.lookup(chunk)  # type: ignore[misc]
    raw = bytearray((root / pack).read_bytes())
    raw[entry.offset + entry.length // 2] ^= 0xFF
    (root / pack).write_bytes(bytes(raw))
    with pytest.raises(RestoreTestFailed):
        run_flow(restore_test, everything=True, repository=url)
    (root / "snapshots" / first).unlink()  # deleted without a tombstone: a gap in alpha's chain
    (root / "snapshots" / ("e" * 64)).write_bytes(b'{"record": {"source": "alpha", "serial": 9}, "mac": "00"}\n')

    with pytest.raises(AuditFailed) as failed:
        run_flow(audit, repository=url)
    report = failed.value.report
    critical = [a.message for a in report.actions if a.level == "critical"]
    assert any("hash chain: source 'alpha' snapshot 2" in m and "gap" in m for m in critical), critical
    assert any(m.startswith("the last restore test of source alpha failed") for m in critical), critical
    assert "1 damaged snapshot records: run `vaultflow check`" in " ".join(critical)
    assert report.chain.damaged_records[0].startswith(f"snapshots/{'e' * 64}: ")
    [t] = report.restore_tests
    assert t.last_run_ok is False and t.last_pass is not None and t.last_pass < str(t.last_run)
    assert (t.files, t.bytes) == (len(passed.files), sum(c.bytes for c in passed.files)) == (2, 100_000)

    with pytest.raises(VaultflowError, match="SOURCE=DURATION"):  # a typo is refused before any flow run
        audit_cli._audit(cli_args("--repo", url, "--rpo", "alpha"))
    assert audit_cli._audit(cli_args("--repo", url)) == 1
    shown = capsys.readouterr().out
    assert shown.startswith(f"# Audit of {url}: ATTENTION") and "gap" in shown and "| FAIL |" in shown
