"""A password typed into a source URL never reaches a flow parameter, a log line, an artifact, a record or a
manifest: it moves into the process environment before anything sees the URL."""

from __future__ import annotations

import json
import os
import uuid

import psycopg
import pytest
from conftest import FAST_KDF
from test_cli_backup import vaultflow

from vaultflow.storage.repository import Repository

SECRET = "s3cr3t-" + uuid.uuid4().hex[:8]  # trust auth on 127.0.0.1 accepts any password


@pytest.fixture
def databases():
    names = [f"vf_cred_{uuid.uuid4().hex[:8]}" for _ in range(2)]
    with psycopg.connect("host=127.0.0.1 user=postgres dbname=postgres", autocommit=True) as c:
        c.execute(f"CREATE DATABASE {names[0]}")
    with psycopg.connect(f"host=127.0.0.1 user=postgres dbname={names[0]}", autocommit=True) as c:
        c.execute("CREATE TABLE t (id int primary key, v text)")
        c.execute("INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, 500) g")
    try:
        yield names
    finally:
        with psycopg.connect("host=127.0.0.1 user=postgres dbname=postgres", autocommit=True) as c:
            for n in names:
                c.execute(f"DROP DATABASE IF EXISTS {n} WITH (FORCE)")


def test_a_password_in_a_database_url_is_nowhere_in_prefect_or_the_repository(databases, prefect_server, tmp_path):
    from datetime import UTC, datetime

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterStartTime, LogFilter, LogFilterFlowRunId

    since = datetime.now(UTC)
    Repository.init(str(tmp_path / "repo"), "pw", kdf=FAST_KDF)
    env = {"VAULTFLOW_REPOSITORY": str(tmp_path / "repo"), "VAULTFLOW_PASSWORD": "pw",
           "VAULTFLOW_HOME": str(tmp_path / "home"), "PREFECT_API_URL": prefect_server}
    src, dst = databases
    vaultflow(["backup", f"postgresql://postgres:{SECRET}@127.0.0.1:5432/{src}", "--source", "cred", "-v"], env)
    vaultflow(["restore-test", "-v"], env)
    vaultflow(["restore", "cred:latest", "--stream", f"{src}.pgdump", "--to-database",
               f"postgresql://postgres:{SECRET}@127.0.0.1:5432/{dst}", "-v"], env)
    with psycopg.connect(f"host=127.0.0.1 user=postgres dbname={dst}") as c:
        assert c.execute("SELECT count(*) FROM t").fetchone() == (500,)

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            start_time=FlowRunFilterStartTime(after_=since)))
        assert {r.name for r in runs} and len(runs) >= 3
        ids = [r.id for r in runs]
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=ids)))
        arts = client.read_artifacts()
    seen = json.dumps([r.parameters for r in runs], default=str)
    assert f"postgresql://postgres@127.0.0.1:5432/{src}" in seen  # the URL is there, without the password
    assert SECRET not in seen
    assert logs and SECRET not in "\n".join(log.message for log in logs)
    assert arts and SECRET not in json.dumps([a.data for a in arts], default=str)

    assert SECRET not in vaultflow(["snapshots", "--json"], env).stdout
    repo = Repository.open(str(tmp_path / "repo"), "pw")
    [(rid, record)] = repo.snapshots().items()
    assert record.paths == [f"postgresql://postgres@127.0.0.1:5432/{src}"]
    assert SECRET not in json.dumps(record.body())
    assert SECRET not in str(repo.files_table(record).to_pylist())
    assert SECRET not in str(repo.databases_table(record).to_pylist())
    for folder, _, files in os.walk(tmp_path):  # nothing written anywhere the test can see, repository or home
        for f in files:
            if not os.path.isfile(os.path.join(folder, f)) or f.endswith(".sock"):
                continue
            with open(os.path.join(folder, f), "rb") as fh:
                assert SECRET.encode() not in fh.read(), os.path.join(folder, f)
