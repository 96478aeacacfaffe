"""Analysts read the Parquet manifests with DuckDB and polars, without vaultflow, locally and on S3."""

from __future__ import annotations

import json
import time

import duckdb
import polars as pl
import pytest
from conftest import FAST_KDF

from vaultflow.storage.repository import Repository

QUERY = """
select source, snapshot, size, status
from read_parquet('{root}/manifests/**/*.parquet', hive_partitioning = true)
where path = 'docs/report.csv'
order by snapshot
"""


@pytest.fixture
def two_snapshots(location, prefect_server, monkeypatch, tmp_path):
    from vaultflow.flows.backup import backup
    from vaultflow.flows.runtime import run_flow

    monkeypatch.setenv("VAULTFLOW_PASSWORD", "pw")
    monkeypatch.setenv("VAULTFLOW_STORAGE_OPTIONS", json.dumps(location.storage_options))
    repo = Repository.init(location.url, "pw", storage_options=location.storage_options, kdf=FAST_KDF)
    src = tmp_path / "src" / "docs"
    src.mkdir(parents=True)
    (src / "report.csv").write_text("a,b\n1,2\n")
    (src / "other.txt").write_text("x")
    run_flow(backup, paths=[str(src.parent)], source="reports", repository=location.url)
    time.sleep(0.01)
    (src / "report.csv").write_text("a,b\n1,2\n3,4\n")
    run_flow(backup, paths=[str(src.parent)], source="reports", repository=location.url)
    return repo


def duck(location) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection that reads the repository: directly, or through s3fs registered as a filesystem."""
    con = duckdb.connect()
    if location.kind == "s3":
        import s3fs

        con.register_filesystem(s3fs.S3FileSystem(**location.storage_options))
    return con


def test_which_snapshots_hold_a_file_and_with_what_size(two_snapshots, location):
    rows = duck(location).sql(QUERY.format(root=location.url)).fetchall()
    assert rows == [("reports", 1, 8, "new"), ("reports", 2, 12, "changed")]


def test_polars_reads_the_same_manifests(two_snapshots, location):
    if location.kind == "local":
        frame = pl.read_parquet(f"{location.url}/manifests/**/*.parquet", hive_partitioning=True)
    else:
        import s3fs

        fs = s3fs.S3FileSystem(**location.storage_options)
        paths = sorted(fs.glob(f"{location.url}/manifests/**/*.parquet"))
        frame = pl.concat([pl.read_parquet(fs.open(p, "rb")).with_columns(
            pl.lit(int(p.split("snapshot=")[1].split("/")[0])).alias("snapshot")) for p in paths])
    got = frame.filter(pl.col("path") == "docs/report.csv").sort("snapshot").select("snapshot", "size")
    assert got.rows() == [(1, 8), (2, 12)]


def test_snapshots_table_has_one_row_per_snapshot(two_snapshots, location):
    rows = duck(location).sql("select serial, files, files_changed from read_parquet("
                              f"'{location.url}/tables/snapshots/**/*.parquet', hive_partitioning = true) "
                              "order by serial").fetchall()
    assert rows == [(1, 2, 0), (2, 2, 1)]
    assert not two_snapshots.backend.exists("tables/errors")  # no errors, no errors table
