"""A source on any fsspec filesystem: an S3 prefix (moto server through s3fs) backed up like a folder."""

from __future__ import annotations

import json
import time

import s3fs
from backup_helpers import entries, read_back
from conftest import FAST_KDF

from vaultflow.storage.repository import Repository


def test_an_s3_prefix_is_backed_up_incrementally_and_reads_back(s3_server, prefect_server, monkeypatch, tmp_path):
    from vaultflow.flows.backup import backup
    from vaultflow.flows.runtime import run_flow

    bucket = s3_server.new_bucket()
    fs = s3fs.S3FileSystem(**s3_server.storage_options)
    objects = {b"exports/2026/a.csv": b"id,v\n1,2\n" * 1000, b"exports/2026/b.json": b'{"k": 1}',
               b"readme.txt": b"hello"}
    for key, data in objects.items():
        fs.pipe(f"{bucket}/data/{key.decode()}", data)
    monkeypatch.setenv("VAULTFLOW_PASSWORD", "pw")
    monkeypatch.setenv("VAULTFLOW_SOURCE_STORAGE_OPTIONS", json.dumps(s3_server.storage_options))
    repo = Repository.init(str(tmp_path / "repo"), "pw", kdf=FAST_KDF)
    url = f"s3://{bucket}/data"
    time.sleep(2.1)  # objects written just before a backup are racy: the next backup would reread them

    first = run_flow(backup, paths=[url], repository=repo.url)
    assert first.files == 3 and first.source.startswith("s3-vf-")
    assert read_back(repo) == objects
    assert entries(repo)[b"exports/2026"]["type"] == "dir"

    second = run_flow(backup, paths=[url], repository=repo.url)
    assert second.bytes_read == 0 and second.files_unchanged == 3

    fs.pipe(f"{bucket}/data/readme.txt", b"hello, again")
    third = run_flow(backup, paths=[url], repository=repo.url)
    assert (third.files_changed, third.bytes_read) == (1, 12)
    assert read_back(Repository.open(repo.url, "pw"))[b"readme.txt"] == b"hello, again"
