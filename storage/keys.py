"""The key hierarchy: a random master key, wrapped once per password in `keys/<id>` files.

Passwords go through a memory-hard KDF (Argon2id by default, scrypt accepted); parameters live in the key file.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

import blake3
from argon2.low_level import Type, hash_secret_raw
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .crypto import KEY_SIZE, NONCE_SIZE, derive_subkey
from .errors import IntegrityError, WrongPassword

KEY_FILE_VERSION = 1


@dataclass(frozen=True)
class KdfParams:
    """Memory-hard KDF settings; Argon2id defaults follow RFC 9106's second recommended option."""

    algorithm: str = "argon2id"  # or "scrypt"
    time_cost: int = 3  # argon2 passes; for scrypt: log2(N)
    memory_kib: int = 65536  # argon2 memory; for scrypt: r * 1024 (so 8192 means r=8)
    parallelism: int = 4


@dataclass(frozen=True)
class MasterKey:
    """The repository's 256-bit master key and the subkeys derived from it."""

    raw: bytes

    def subkey(self, purpose: str) -> bytes:
        return derive_subkey(self.raw, purpose)

    @property
    def chunk_id_key(self) -> bytes:
        return self.subkey("chunk id")

    @property
    def blob_key(self) -> bytes:
        return self.subkey("blob encryption")

    @property
    def index_key(self) -> bytes:
        return self.subkey("index encryption")

    @property
    def record_key(self) -> bytes:
        return self.subkey("snapshot record mac")

    @property
    def config_key(self) -> bytes:
        return self.subkey("config mac")

    @property
    def file_hash_key(self) -> bytes:
        return self.subkey("file content hash")

    @property
    def manifest_key(self) -> bytes:
        return self.subkey("manifest encryption")

    @property
    def chunker_seed(self) -> int:
        # A secret per-repository gear table makes chunk boundaries (and sizes) depend on the key.
        return 1 + int.from_bytes(self.subkey("chunker seed")[:8], "big") % ((1 << 63) - 1)

    def __repr__(self) -> str:  # never print key material
        return "MasterKey(<secret>)"

    @staticmethod
    def generate() -> MasterKey:
        return MasterKey(os.urandom(KEY_SIZE))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


def _stretch(password: bytes, salt: bytes, p: KdfParams) -> bytes:
    if p.algorithm == "argon2id":
        return hash_secret_raw(password, salt, p.time_cost, p.memory_kib, p.parallelism, KEY_SIZE, Type.ID)
    if p.algorithm == "scrypt":
        r = max(1, p.memory_kib // 1024)
        return hashlib.scrypt(password, salt=salt, n=1 << p.time_cost, r=r, p=p.parallelism,
                              maxmem=256 * r * (1 << p.time_cost) + (64 << 20), dklen=KEY_SIZE)
    raise ValueError(f"unknown KDF {p.algorithm!r}")


def _canonical(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def wrap_master_key(master: MasterKey, password: str, params: KdfParams | None = None) -> bytes:
    """A key file: the master key encrypted under a key stretched from `password`."""
    params = params or KdfParams()
    salt = os.urandom(32)
    body: dict[str, Any] = {
        "version": KEY_FILE_VERSION,
        "kdf": {**asdict(params), "salt": _b64(salt)},
        "created": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "host": socket.gethostname(),
        "username": os.environ.get("USER", ""),
    }
    kek = _stretch(password.encode(), salt, params)
    nonce = os.urandom(NONCE_SIZE)
    # The KDF parameters are associated data: weakening them in the file breaks the tag.
    body["nonce"] = _b64(nonce)
    body["wrapped"] = _b64(AESGCM(kek).encrypt(nonce, master.raw, _canonical(body["kdf"])))
    body["checksum"] = blake3.blake3(_canonical(body)).hexdigest()
    return json.dumps(body, indent=1, sort_keys=True).encode() + b"\n"


def unwrap_master_key(data: bytes, password: str, obj: str) -> MasterKey:
    """Open a key file; corruption raises IntegrityError (naming `obj`), a wrong password WrongPassword."""
    try:
        body = json.loads(data)
        checksum = body.pop("checksum")
    except (ValueError, KeyError, TypeError, AttributeError):
        raise IntegrityError(obj, "key file is not valid JSON or lacks its checksum (corrupted)") from None
    if blake3.blake3(_canonical(body)).hexdigest() != checksum:
        raise IntegrityError(obj, "key file checksum mismatch (corrupted or modified)")
    try:
        kdf = dict(body["kdf"])
        salt = _unb64(kdf.pop("salt"))
        params = KdfParams(**kdf)
        nonce, wrapped = _unb64(body["nonce"]), _unb64(body["wrapped"])
    except (KeyError, TypeError, ValueError) as e:
        raise IntegrityError(obj, f"key file is malformed ({e})") from None
    kek = _stretch(password.encode(), salt, params)
    try:
        raw = AESGCM(kek).decrypt(nonce, wrapped, _canonical(body["kdf"]))
    except InvalidTag:
        raise WrongPassword(f"{obj}: wrong password (this key file does not open with it)") from None
    return MasterKey(raw)
