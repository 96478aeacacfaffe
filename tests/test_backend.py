"""The storage backend on local disk and on S3: atomic, immutable, listable."""

from __future__ import annotations

import os

import pytest

from vaultflow.storage.backend import Backend
from vaultflow.storage.errors import ObjectExists, ObjectMissing


def test_write_read_list_and_ranges(location):
    b = Backend(location.url, location.storage_options)
    b.write("data/ab/obj1", b"hello world")
    b.write("data/cd/obj2", b"x" * 1000)
    assert b.read("data/ab/obj1") == b"hello world"
    assert b.read_range("data/cd/obj2", 10, 20) == b"x" * 10
    assert b.read_ranges("data/ab/obj1", [(0, 5), (6, 11)]) == [b"hello", b"world"]
    assert b.size("data/cd/obj2") == 1000
    assert list(b.list("data")) == [("data/ab/obj1", 11), ("data/cd/obj2", 1000)]
    assert list(b.list("nothing-here")) == []


def test_never_overwrites_an_object(location):
    b = Backend(location.url, location.storage_options)
    b.write("snapshots/x", b"first")
    with pytest.raises(ObjectExists, match="snapshots/x"):
        b.write("snapshots/x", b"other")
    assert b.read("snapshots/x") == b"first"


def test_content_named_rewrite_is_idempotent(location):
    b = Backend(location.url, location.storage_options)
    b.write("data/aa/same", b"payload", content_named=True)
    b.write("data/aa/same", b"payload", content_named=True)  # a resumed run re-sends the same pack
    assert b.read("data/aa/same") == b"payload"


def test_missing_object_is_named(location):
    b = Backend(location.url, location.storage_options)
    with pytest.raises(ObjectMissing, match="data/zz/nope"):
        b.read("data/zz/nope")


def test_rejects_object_names_that_escape_the_root(tmp_path):
    b = Backend(str(tmp_path))
    for bad in ("../x", "/etc/passwd", "a/../../b"):
        with pytest.raises(ValueError):
            b.path(bad)


def test_local_write_leaves_no_temp_files_and_is_durable(tmp_path):
    b = Backend(str(tmp_path / "r"))
    b.write("index/abc", b"data")
    assert sorted(os.listdir(tmp_path / "r" / "index")) == ["abc"]
    assert list(b.list("index")) == [("index/abc", 4)]


def test_listing_ignores_interrupted_temp_files(tmp_path):
    b = Backend(str(tmp_path / "r"))
    (tmp_path / "r" / "data").mkdir(parents=True)
    (tmp_path / "r" / "data" / ".tmp-abc-123").write_bytes(b"half")
    assert list(b.list("data")) == []
