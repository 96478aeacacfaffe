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

from .crypto import KEY_SIZE, NONCE_SIZE, OVERHEAD, TAG_SIZE, Sealer, derive_subkey
from .errors import IntegrityError, WrongPassword

KEY_FILE_VERSION = 1
MAX_KEY_FILE_SIZE = 64 << 10  # a key file is under 1 KiB; anything far larger is not one (and is not read)
SALT_SIZE = 32
_FIELDS = {"version", "kdf", "created", "nonce", "wrapped", "info", "checksum"}
_KDF_FIELDS = {"algorithm", "time_cost", "memory_kib", "parallelism", "salt"}
_INFO_AAD = b"vaultflow key file info v1"
_MAX_INFO = 4096

# Every KDF parameter is bounded (docs/format.md §2): a key file anyone can write must not make `open` spin for
# months or allocate gigabytes before it even tries the next key file.
ARGON2_TIME_COST = (1, 16)
ARGON2_MEMORY_KIB = (1024, 1 << 20)  # 1 MiB .. 1 GiB
ARGON2_PARALLELISM = (1, 16)
SCRYPT_LOG2_N = (10, 20)
SCRYPT_R = (1, 32)  # memory_kib = r * 1024
SCRYPT_PARALLELISM = (1, 4)
SCRYPT_MAX_MEMORY = 1 << 30  # 128 * r * N bytes


@dataclass(frozen=True)
class KdfParams:
    """Memory-hard KDF settings; Argon2id defaults follow RFC 9106's second recommended option."""

    algorithm: str = "argon2id"  # or "scrypt"
    time_cost: int = 3  # argon2 passes; for scrypt: log2(N)
    memory_kib: int = 65536  # argon2 memory; for scrypt: r * 1024 (so 8192 means r=8)
    parallelism: int = 4

    def check(self) -> None:
        """Raise ValueError unless every parameter is of the right type and inside its documented range."""
        for name in ("time_cost", "memory_kib", "parallelism"):
            if type(getattr(self, name)) is not int:
                raise ValueError(f"KDF {name} must be an integer, not {getattr(self, name)!r}")
        if self.algorithm == "argon2id":
            bounds = {"time_cost": ARGON2_TIME_COST, "memory_kib": ARGON2_MEMORY_KIB,
                      "parallelism": ARGON2_PARALLELISM}
        elif self.algorithm == "scrypt":
            bounds = {"time_cost": SCRYPT_LOG2_N, "parallelism": SCRYPT_PARALLELISM,
                      "memory_kib": (SCRYPT_R[0] * 1024, SCRYPT_R[1] * 1024)}
            if self.memory_kib % 1024:
                raise ValueError(f"scrypt memory_kib {self.memory_kib} is not a multiple of 1024 (r * 1024)")
        else:
            raise ValueError(f"unknown KDF {str(self.algorithm)[:40]!r}; expected 'argon2id' or 'scrypt'")
        for name, (low, high) in bounds.items():
            value = getattr(self, name)
            if not low <= value <= high:
                raise ValueError(f"{self.algorithm} {name} {value} is outside {low}..{high}")
        if self.algorithm == "scrypt" and 128 * (self.memory_kib // 1024) << self.time_cost > SCRYPT_MAX_MEMORY:
            raise ValueError(f"scrypt N = 2^{self.time_cost} with r = {self.memory_kib // 1024} needs more than "
                             f"{SCRYPT_MAX_MEMORY >> 20} MiB")


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
    def key_info_key(self) -> bytes:
        return self.subkey("key file info")

    @property
    def chunker_seed(self) -> int:
        # A secret per-repository gear table makes chunk boundaries (and sizes) depend on the key.
        return 1 + int.from_bytes(self.subkey("chunker seed")[:8], "big") % ((1 << 63) - 1)

    def __repr__(self) -> str:  # never print key material
        return "MasterKey(<secret>)"

    @staticmethod
    def generate() -> MasterKey:
        return MasterKey(os.urandom(KEY_SIZE))


@dataclass(frozen=True)
class KeyFile:
    """A key file whose checksum, structure and KDF bounds were verified (no password needed for that)."""

    params: KdfParams
    salt: bytes
    nonce: bytes
    wrapped: bytes
    info: bytes
    created: str
    body: dict[str, Any]  # every field but the checksum, for the associated data


@dataclass(frozen=True)
class KeyInfo:
    """What `key list` shows of one key file; `problem` says why a damaged one cannot be used."""

    name: str
    created: str = ""
    host: str = ""
    username: str = ""
    problem: str | None = None

    @property
    def id(self) -> str:
        return self.name.rsplit("/", 1)[-1]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(value: Any, field: str, size: int | tuple[int, int]) -> bytes:
    if not isinstance(value, str):
        raise ValueError(f"{field} is not a base64 string")
    raw = base64.b64decode(value.encode("ascii"), validate=True)
    low, high = (size, size) if isinstance(size, int) else size
    if not low <= len(raw) <= high:
        raise ValueError(f"{field} is {len(raw)} bytes, expected {size}")
    return raw


def _stretch(password: bytes, salt: bytes, p: KdfParams) -> bytes:
    p.check()  # the last line of defence: never run a KDF with unbounded parameters
    if p.algorithm == "argon2id":
        return hash_secret_raw(password, salt, p.time_cost, p.memory_kib, p.parallelism, KEY_SIZE, Type.ID)
    r = p.memory_kib // 1024
    return hashlib.scrypt(password, salt=salt, n=1 << p.time_cost, r=r, p=p.parallelism,
                          maxmem=128 * r * (1 << p.time_cost) + (64 << 20), dklen=KEY_SIZE)


def _canonical(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _info_aad(body: dict[str, Any]) -> bytes:
    # The sealed info authenticates every other field under the master key, so `check` can tell a key file
    # of this repository from a well-formed forgery without knowing its password.
    return _INFO_AAD + _canonical({k: v for k, v in body.items() if k not in ("info", "checksum")})


def wrap_master_key(master: MasterKey, password: str, params: KdfParams | None = None) -> bytes:
    """A key file: the master key encrypted under a key stretched from `password`; host and user name sealed."""
    params = params or KdfParams()
    params.check()
    salt = os.urandom(SALT_SIZE)
    body: dict[str, Any] = {
        "version": KEY_FILE_VERSION,
        "kdf": {**asdict(params), "salt": _b64(salt)},
        "created": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
    }
    kek = _stretch(password.encode(), salt, params)
    nonce = os.urandom(NONCE_SIZE)
    # The KDF parameters are associated data: weakening them in the file breaks the tag.
    body["nonce"] = _b64(nonce)
    body["wrapped"] = _b64(AESGCM(kek).encrypt(nonce, master.raw, _canonical(body["kdf"])))
    info = {"host": socket.gethostname(), "username": os.environ.get("USER", "")}
    body["info"] = _b64(bytes(Sealer(master.key_info_key).seal(_canonical(info), _info_aad(body))))
    body["checksum"] = blake3.blake3(_canonical(body)).hexdigest()
    return json.dumps(body, indent=1, sort_keys=True).encode() + b"\n"


def parse_key_file(data: bytes, obj: str) -> KeyFile:
    """Verify a key file's size, checksum, fields and KDF bounds; any failure raises IntegrityError naming `obj`."""
    if len(data) > MAX_KEY_FILE_SIZE:
        raise IntegrityError(obj, f"key file is {len(data)} bytes, more than a key file's "
                                  f"{MAX_KEY_FILE_SIZE} (not a key file)")
    try:
        body = json.loads(data)
        checksum = body.pop("checksum")
        actual = blake3.blake3(_canonical(body)).hexdigest()  # re-encoding deep JSON can recurse too
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        raise IntegrityError(obj, "key file is not valid JSON or lacks its checksum (corrupted)") from None
    if not isinstance(checksum, str) or actual != checksum:
        raise IntegrityError(obj, "key file checksum mismatch (corrupted or modified)")
    try:
        if set(body) | {"checksum"} != _FIELDS:
            raise ValueError(f"fields are {sorted(body)}, expected {sorted(_FIELDS - {'checksum'})}")
        if body["version"] != KEY_FILE_VERSION or type(body["version"]) is not int:
            raise ValueError(f"version {str(body['version'])[:20]} is not {KEY_FILE_VERSION}")
        kdf = body["kdf"]
        if not isinstance(kdf, dict) or set(kdf) != _KDF_FIELDS:
            raise ValueError(f"kdf must have exactly the fields {sorted(_KDF_FIELDS)}")
        params = KdfParams(**{k: v for k, v in kdf.items() if k != "salt"})
        params.check()
        created = body["created"]
        if not isinstance(created, str) or len(created) > 40:
            raise ValueError("created is not a time")
        return KeyFile(params=params, salt=_unb64(kdf["salt"], "salt", SALT_SIZE),
                       nonce=_unb64(body["nonce"], "nonce", NONCE_SIZE),
                       wrapped=_unb64(body["wrapped"], "wrapped", KEY_SIZE + TAG_SIZE),
                       info=_unb64(body["info"], "info", (OVERHEAD, OVERHEAD + _MAX_INFO)), created=created,
                       body=body)
    except (KeyError, TypeError, ValueError) as e:
        raise IntegrityError(obj, f"key file is malformed or out of bounds ({e})") from None


def unwrap_master_key(data: bytes, password: str, obj: str) -> MasterKey:
    """Open a key file; corruption raises IntegrityError (naming `obj`), a wrong password WrongPassword."""
    kf = parse_key_file(data, obj)
    try:
        kek = _stretch(password.encode(), kf.salt, kf.params)
    except Exception as e:  # whatever the KDF library raises, this one key file is unusable, not the others
        raise IntegrityError(obj, f"key derivation failed ({type(e).__name__}: {e})") from None
    try:
        raw = AESGCM(kek).decrypt(kf.nonce, kf.wrapped, _canonical(kf.body["kdf"]))
    except InvalidTag:
        raise WrongPassword(f"{obj}: wrong password (this key file does not open with it)") from None
    return MasterKey(raw)


def key_info(master: MasterKey, data: bytes, obj: str) -> KeyInfo:
    """Created time, host and user name of a key file, authenticated with the master key (any password's)."""
    kf = parse_key_file(data, obj)
    try:
        plain = Sealer(master.key_info_key).open(kf.info, _info_aad(kf.body), obj)
    except IntegrityError:
        raise IntegrityError(obj, "key file does not authenticate with this repository's master key (a key file "
                                  "of another repository, forged, or modified)") from None
    try:
        info = json.loads(plain)
        host, username = info["host"], info["username"]
        if not isinstance(host, str) or not isinstance(username, str):
            raise TypeError
    except (ValueError, KeyError, TypeError, RecursionError):
        raise IntegrityError(obj, "key file info is not the expected JSON") from None
    return KeyInfo(obj, kf.created, host, username)
