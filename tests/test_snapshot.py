"""Snapshot records: round trip, authentication of every byte, and hash-chain problems by name."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vaultflow.storage.errors import IntegrityError
from vaultflow.storage.snapshot import SnapshotRecord, chain_problems, decode_record, encode_record

KEY = os.urandom(32)


def rec(serial: int, previous: str | None, source: str = "home", started: str | None = None) -> SnapshotRecord:
    t = started or f"2026-11-25T10:{serial:02d}:00.000000Z"
    return SnapshotRecord(source=source, serial=serial, started=t, finished=t.replace(":00.", ":30."), host="h",
                          parent=previous, previous=previous, manifests={"manifests/x": "ab" * 32})


@settings(max_examples=100, deadline=None)
@given(source=st.text(max_size=40), serial=st.integers(1, 2**40), host=st.text(max_size=20),
       manifests=st.dictionaries(st.text(max_size=30), st.text("0123456789abcdef", min_size=64, max_size=64),
                                 max_size=4),
       stats=st.dictionaries(st.text(max_size=10), st.integers(0, 2**62) | st.floats(0, 1e12), max_size=5),
       private=st.booleans())
def test_records_round_trip(source, serial, host, manifests, stats, private):
    r = SnapshotRecord(source=source, serial=serial, started="2026-01-01T00:00:00.000000Z",
                       finished="2026-01-01T00:00:01.000000Z", host=host, parent=None, previous=None,
                       manifests=manifests, stats=stats, tags=["a"])
    rid, data = encode_record(KEY, r, private)
    assert decode_record(KEY, data, "snapshots/x", rid) == r
    assert encode_record(KEY, r, private) == (rid, data)


def test_every_flipped_bit_is_detected_and_names_the_record():
    rid, data = encode_record(KEY, rec(1, None))
    for i in range(len(data)):
        for bit in range(8):
            bad = bytearray(data)
            bad[i] ^= 1 << bit
            with pytest.raises(IntegrityError, match="snapshots/abc"):
                decode_record(KEY, bytes(bad), "snapshots/abc", rid)
            # even without the id check the MAC or the parser catches it, unless only JSON layout changed
            try:
                assert decode_record(KEY, bytes(bad), "snapshots/abc") == rec(1, None)
            except IntegrityError:
                pass


def test_record_from_another_repository_is_refused():
    rid, data = encode_record(os.urandom(32), rec(1, None))
    with pytest.raises(IntegrityError, match="MAC mismatch"):
        decode_record(KEY, data, "snapshots/abc", rid)


def test_chain_problems_gap_fork_rollback_and_broken_link():
    a_id, _ = encode_record(KEY, a := rec(1, None))
    b_id, _ = encode_record(KEY, b := rec(2, a_id))
    c_id, _ = encode_record(KEY, c := rec(3, b_id))
    assert chain_problems({a_id: a, b_id: b, c_id: c}) == []
    gap = chain_problems({a_id: a, c_id: c})
    assert len(gap) == 1 and "gap" in gap[0] and "serial 2" in gap[0]
    fork_id, _ = encode_record(KEY, fork := rec(2, a_id, started="2026-11-25T10:05:00.000000Z"))
    assert any("fork" in p for p in chain_problems({a_id: a, b_id: b, fork_id: fork}))
    back_id, _ = encode_record(KEY, back := rec(2, a_id, started="2026-11-25T09:00:00.000000Z"))
    assert any("rollback" in p for p in chain_problems({a_id: a, back_id: back}))
    other_id, _ = encode_record(KEY, other := rec(1, None, source="db"))
    wrong_id, _ = encode_record(KEY, wrong := rec(2, other_id))
    assert any("broken chain" in p for p in chain_problems({a_id: a, other_id: other, wrong_id: wrong}))


def private_rec() -> SnapshotRecord:
    return SnapshotRecord(source="home", serial=3, started="2026-11-25T10:00:00.000000Z",
                          finished="2026-11-25T10:00:01.000000Z", host="secret-host.example", parent="ab" * 32,
                          previous="cd" * 32,
                          manifests={"manifests/source=home/snapshot=3/files.parquet.enc": "ef" * 32},
                          index_files=["index/" + "01" * 32], stats={"files": 987654321, "ratio": 0.123456},
                          paths=["/srv/payroll/2026"], tags=["quarterly-close"], vaultflow_version="0.1.0")


def test_private_record_hides_descriptive_fields_round_trips_and_is_deterministic():
    r = private_rec()
    rid, data = encode_record(KEY, r, private=True)
    for secret in (b"payroll", b"secret-host", b"987654321", b"0.123456", b"quarterly", b"files.parquet", b"01" * 32,
                   b"2026-11-25T10"):
        assert secret not in data
    assert b'"source":"home"' in data and b'"serial":3' in data  # the chain skeleton stays readable
    assert encode_record(KEY, r, private=True) == (rid, data)  # a retried commit names the same object
    assert decode_record(KEY, data, "snapshots/p", rid) == r
    assert encode_record(KEY, r)[1] != data


def test_every_flipped_bit_of_a_private_record_is_detected():
    rid, data = encode_record(KEY, private_rec(), private=True)
    for i in range(len(data)):
        bad = bytearray(data)
        bad[i] ^= 1 << (i % 8)
        with pytest.raises(IntegrityError, match="snapshots/p"):
            decode_record(KEY, bytes(bad), "snapshots/p")


@pytest.mark.parametrize("private", [False, True])
def test_only_the_canonical_spelling_of_a_record_is_accepted(private):
    rid, data = encode_record(KEY, rec(1, None), private)
    mac = data[data.index(b'"mac":"') + 7:][:64]
    variants = [data.replace(mac, mac.upper()), data.replace(b",", b", ", 1), data.rstrip(b"\n"),
                data.replace(b'"source":"home"', b'"source":"\\u0068ome"')]
    for variant in variants:
        assert variant != data
        with pytest.raises(IntegrityError, match="snapshots/v"):
            decode_record(KEY, variant, "snapshots/v")


def test_hostile_json_is_an_integrity_error():
    for data in (b"[" * 100_000 + b"]" * 100_000, b'{"record": [], "mac": "00"}', b'{"record": {}, "mac": 5}',
                 b"\xff\xfe", b"null"):
        with pytest.raises(IntegrityError, match="snapshots/h"):
            decode_record(KEY, data, "snapshots/h")
