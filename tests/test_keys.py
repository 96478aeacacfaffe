"""Key files: the master key survives a round trip; wrong passwords and any damage are told apart."""

from __future__ import annotations

import pytest
from conftest import FAST_KDF

from vaultflow.storage.errors import IntegrityError, WrongPassword
from vaultflow.storage.keys import KdfParams, MasterKey, unwrap_master_key, wrap_master_key


def test_round_trip_with_default_argon2id_parameters():
    master = MasterKey.generate()
    data = wrap_master_key(master, "correct horse")
    assert b'"algorithm": "argon2id"' in data and b'"memory_kib": 65536' in data
    assert unwrap_master_key(data, "correct horse", "keys/k").raw == master.raw


def test_round_trip_with_scrypt():
    master = MasterKey.generate()
    data = wrap_master_key(master, "pw", KdfParams(algorithm="scrypt", time_cost=10, memory_kib=8192, parallelism=1))
    assert unwrap_master_key(data, "pw", "keys/k").raw == master.raw


def test_wrong_password_is_refused_cleanly():
    data = wrap_master_key(MasterKey.generate(), "right", FAST_KDF)
    with pytest.raises(WrongPassword, match="keys/k1: wrong password"):
        unwrap_master_key(data, "wrong", "keys/k1")


def test_key_material_is_not_in_the_file_in_the_clear():
    master = MasterKey.generate()
    data = wrap_master_key(master, "pw", FAST_KDF)
    assert master.raw not in data and master.raw.hex().encode() not in data
    assert "secret" in repr(master) and master.raw.hex() not in repr(master)


def test_every_flipped_bit_in_a_key_file_is_detected_as_damage_not_a_wrong_password():
    data = wrap_master_key(MasterKey.generate(), "pw", FAST_KDF)
    for i in range(len(data)):
        for bit in range(8):
            bad = bytearray(data)
            bad[i] ^= 1 << bit
            with pytest.raises(IntegrityError, match="keys/k9"):
                unwrap_master_key(bytes(bad), "pw", "keys/k9")


def test_every_truncation_of_a_key_file_is_detected():
    data = wrap_master_key(MasterKey.generate(), "pw", FAST_KDF)
    for n in range(len(data) - 1):  # the trailing newline is not content
        with pytest.raises(IntegrityError, match="keys/k9"):
            unwrap_master_key(data[:n], "pw", "keys/k9")


def test_subkeys_differ_per_purpose_and_seed_fits_the_chunker():
    m = MasterKey.generate()
    keys = {m.chunk_id_key, m.blob_key, m.index_key, m.record_key, m.config_key, m.manifest_key, m.file_hash_key}
    assert len(keys) == 7 and m.raw not in keys
    assert 1 <= m.chunker_seed < 1 << 63
