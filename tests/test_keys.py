"""Key files: the master key survives a round trip; wrong passwords and any damage are told apart."""

from __future__ import annotations

import json
import os
import socket

import pytest
from conftest import FAST_KDF

from vaultflow.storage.errors import IntegrityError, VaultflowError, WrongPassword
from vaultflow.storage.keys import KdfParams, MasterKey, key_info, unwrap_master_key, wrap_master_key
from vaultflow.storage.repository import Repository


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


@pytest.mark.parametrize("params", [
    KdfParams(time_cost=0), KdfParams(time_cost=17), KdfParams(memory_kib=512),
    KdfParams(memory_kib=(1 << 20) + 1), KdfParams(parallelism=0), KdfParams(parallelism=17),
    KdfParams(algorithm="scrypt", time_cost=9, memory_kib=8192, parallelism=1),
    KdfParams(algorithm="scrypt", time_cost=21, memory_kib=1024, parallelism=1),
    KdfParams(algorithm="scrypt", time_cost=20, memory_kib=16384, parallelism=1),  # 2 GiB
    KdfParams(algorithm="scrypt", time_cost=14, memory_kib=8000, parallelism=1),  # r not whole
    KdfParams(algorithm="scrypt", time_cost=14, memory_kib=8192, parallelism=5),
    KdfParams(algorithm="bcrypt"), KdfParams(time_cost=True), KdfParams(memory_kib=65536.0),  # type: ignore[arg-type]
])
def test_wrap_refuses_kdf_parameters_outside_the_documented_bounds(params):
    with pytest.raises(ValueError, match="KDF|argon2id|scrypt"):
        wrap_master_key(MasterKey.generate(), "pw", params)


def test_the_bounds_admit_the_defaults_the_test_setting_and_the_largest_allowed():
    for params in (KdfParams(), FAST_KDF, KdfParams(algorithm="scrypt", time_cost=20, memory_kib=8192,
                                                    parallelism=4), KdfParams(time_cost=16, memory_kib=1 << 20,
                                                                              parallelism=16)):
        params.check()


def test_host_and_user_are_sealed_and_readable_only_with_the_master_key(monkeypatch):
    monkeypatch.setenv("USER", "alice-the-admin")
    # A distinctive host name: a short real one ("vm") turns up in base64 by chance
    monkeypatch.setattr(socket, "gethostname", lambda: "db-primary-eu-west")
    master = MasterKey.generate()
    data = wrap_master_key(master, "pw", FAST_KDF)
    assert b"alice-the-admin" not in data and b"db-primary-eu-west" not in data
    assert set(json.loads(data)) == {"version", "kdf", "created", "nonce", "wrapped", "info", "checksum"}
    info = key_info(master, data, "keys/k")
    assert (info.host, info.username, info.created) == ("db-primary-eu-west", "alice-the-admin",
                                                        json.loads(data)["created"])
    with pytest.raises(IntegrityError, match="keys/k: key file does not authenticate"):
        key_info(MasterKey.generate(), data, "keys/k")


def test_keys_are_listed_with_their_info_and_removed_by_bare_id_or_prefix(tmp_path, monkeypatch):
    monkeypatch.setenv("USER", "bob")
    repo = Repository.init(str(tmp_path / "repo"), "pw", kdf=FAST_KDF)
    second = repo.add_key("second", FAST_KDF)
    third = repo.add_key("third", FAST_KDF)
    listed = {k.name: k for k in repo.describe_keys()}
    assert set(listed) == {repo.key_name, second, third}
    assert all(k.problem is None and k.username == "bob" and k.host and k.created.endswith("Z")
               for k in listed.values())
    assert repo.resolve_key(second) == second and repo.resolve_key(second[5:]) == second
    assert repo.resolve_key(third[5:13].upper()) == third
    for nothing in ("zz", "", "keys/"):
        with pytest.raises(VaultflowError, match="matches no key file"):
            repo.resolve_key(nothing)
    twin = f"keys/{second[5:9]}{'0' * 28}"
    repo.backend.write(twin, repo.backend.read(second))
    with pytest.raises(VaultflowError, match="ambiguous"):
        repo.resolve_key(second[5:9])
    repo.backend.delete(twin)
    assert repo.remove_key(second[5:]) == second and second not in repo.list_keys()
    # a damaged key file does not count as "another password": the last good one stays
    os.remove(tmp_path / "repo" / third)
    (tmp_path / "repo" / third).write_bytes(b"{}")
    with pytest.raises(VaultflowError, match="only key"):
        repo.remove_key(repo.key_name[5:])
    assert repo.remove_key(third[5:14]) == third
