"""Hostile key files: junk in keys/ (well-formed checksums, absurd KDF parameters, deep JSON, huge objects)
never blocks the correct password, never runs an unbounded KDF, and is reported by name."""

from __future__ import annotations

import json
import time

import blake3
import pytest
from conftest import FAST_KDF

from vaultflow.storage.checker import Checker
from vaultflow.storage.errors import IntegrityError, WrongPassword
from vaultflow.storage.repository import Repository


def forge(template: bytes, change) -> bytes:  # type: ignore[no-untyped-def]
    """A key file with a valid checksum (anyone can compute BLAKE3) after `change` edited its JSON body."""
    body = json.loads(template)
    del body["checksum"]
    change(body)
    body["checksum"] = blake3.blake3(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    return json.dumps(body).encode()


def kdf(**values):  # type: ignore[no-untyped-def]
    return lambda body: body["kdf"].update(values)


HOSTILE = {
    "argon2 memory 4 TiB": kdf(memory_kib=1 << 32),
    "argon2 time_cost 2^31": kdf(time_cost=1 << 31),
    "scrypt N 2^40": kdf(algorithm="scrypt", time_cost=40, memory_kib=8192),
    "scrypt r 2^20": kdf(algorithm="scrypt", time_cost=14, memory_kib=1 << 30),
    "parallelism 2^20": kdf(parallelism=1 << 20),
    "time_cost as text": kdf(time_cost="3"),
    "parallelism as bool": kdf(parallelism=True),
    "unknown algorithm": kdf(algorithm="rot13"),
    "empty salt": kdf(salt=""),
    "salt not base64": kdf(salt="@@@"),
    "salt a number": kdf(salt=7),
    "nonce 1 byte": lambda body: body.update(nonce="AA=="),
    "extra field": lambda body: body.update(host="in the clear"),
    "kdf a list": lambda body: body.update(kdf=[1, 2]),
}


def test_hostile_key_files_sorting_first_do_not_block_the_right_password(location):
    repo = Repository.init(location.url, "pw", storage_options=location.storage_options, kdf=FAST_KDF)
    template = repo.backend.read(repo.key_name)
    hostile = {f"keys/{i:032x}": forge(template, change) for i, change in enumerate(HOSTILE.values())}
    hostile[f"keys/{len(hostile):032x}"] = b"[" * 200_000  # RecursionError in json, and over the size bound
    hostile[f"keys/{len(hostile):032x}"] = b"[" * 50_000  # RecursionError in json, under the size bound
    hostile[f"keys/{len(hostile):032x}"] = b"\xff\xfe not json"
    assert all(name < repo.key_name for name in hostile)  # tried before the real key file
    for name, data in hostile.items():
        repo.backend.write(name, data)

    started = time.monotonic()
    opened = Repository.open(location.url, "pw", storage_options=location.storage_options)
    assert opened.master.raw == repo.master.raw and opened.key_name == repo.key_name
    assert time.monotonic() - started < 20  # no KDF ran with the hostile parameters

    with pytest.raises(WrongPassword) as wrong:
        Repository.open(location.url, "not it", storage_options=location.storage_options)
    assert f"{len(hostile)} damaged key files skipped" in str(wrong.value)
    assert all(name in str(wrong.value) for name in hostile)

    # check reports every damaged key file by name, kind "key", with only this session's password
    problems = [p for p in Checker(opened).structure().problems if p.kind == "key"]
    assert sorted(p.object for p in problems) == sorted(hostile)

    repo.backend.delete(repo.key_name)  # only damaged key files remain: the error names each of them
    with pytest.raises(IntegrityError) as damaged:
        Repository.open(location.url, "pw", storage_options=location.storage_options)
    assert all(name in str(damaged.value) for name in hostile)
    assert "every key file is damaged" in str(damaged.value)

