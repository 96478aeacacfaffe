"""Authenticated encryption, keyed hashing and subkey derivation.

AES-256-GCM with a random 96-bit nonce per message; every object type derives its own subkeys from the master key.
"""

from __future__ import annotations

import os

import blake3
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .errors import IntegrityError

NONCE_SIZE = 12
TAG_SIZE = 16
OVERHEAD = NONCE_SIZE + TAG_SIZE
KEY_SIZE = 32
_CONTEXT = "vaultflow 2026-11-25 {purpose}"


def derive_subkey(master: bytes, purpose: str) -> bytes:
    """A 256-bit key for one purpose; knowing one subkey reveals nothing of the master key or the others."""
    return blake3.blake3(master, derive_key_context=_CONTEXT.format(purpose=purpose)).digest()


def keyed_hash(key: bytes, data: bytes | memoryview) -> bytes:
    """Keyed BLAKE3 (a MAC and a PRF): chunk ids and record MACs; storage cannot confirm known content."""
    return blake3.blake3(data, key=key).digest()


def object_key(key: bytes, salt: bytes) -> bytes:
    """A fresh key per pack or index file, so no key ever sees more than one object's nonces."""
    return blake3.blake3(salt, key=key).digest()


def content_hash(data: bytes | memoryview) -> str:
    """Unkeyed BLAKE3 hex: the name of a content-named object and the hash recorded for it."""
    return blake3.blake3(data, max_threads=blake3.blake3.AUTO if len(data) > 1 << 24 else 1).hexdigest()


class Sealer:
    """AES-256-GCM under one key: `seal` returns prefix || nonce || ciphertext || tag."""

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)

    def seal(self, plaintext: bytes | memoryview, aad: bytes, prefix: bytes = b"") -> bytearray:
        """Encrypt straight into the output buffer: one pass over the data, no concatenation copies."""
        nonce = os.urandom(NONCE_SIZE)
        start = len(prefix) + NONCE_SIZE
        out = bytearray(start + len(plaintext) + TAG_SIZE)
        out[:start] = prefix + nonce
        self._aead.encrypt_into(nonce, plaintext, aad, memoryview(out)[start:])
        return out

    def open(self, sealed: bytes | bytearray | memoryview, aad: bytes, obj: str, skip: int = 0) -> bytes:
        """Decrypt and authenticate `sealed` after its first `skip` bytes; any change to the ciphertext, nonce or
        `aad` raises IntegrityError."""
        if len(sealed) < skip + OVERHEAD:
            raise IntegrityError(obj, f"sealed data is {len(sealed)} bytes, shorter than the "
                                      f"{skip + OVERHEAD}-byte minimum")
        view = memoryview(sealed)[skip:]
        try:
            return self._aead.decrypt(bytes(view[:NONCE_SIZE]), view[NONCE_SIZE:], aad)
        except InvalidTag:
            raise IntegrityError(obj, "authentication failed (the data was modified or corrupted)") from None
