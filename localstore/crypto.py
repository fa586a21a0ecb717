"""Cryptographic primitives: AES-256-GCM values, key wrapping, key derivation, blind-index tags.

Everything here is pure (no SQLite): ``keys.py`` decides which key to use, and
``codecs.py`` decides what bytes to protect. The formats:

Encrypted value (what an ``encrypt=True`` column holds)::

    byte 0      format: 0xE1 (plain) or 0xE2 (with a blind-index tag)
    [16 bytes]  blind-index tag, only with 0xE2; first so an index can range-scan it
    4 bytes     key id (big-endian), a row of ``_ls_keys``
    12 bytes    nonce, fresh from ``os.urandom`` for every value
    n + 16      AES-256-GCM ciphertext and tag

The associated data binds the value to its place: store id, collection, field
and row key, followed by the header itself (format, tag, key id). A value copied
to another row, field or store fails to decrypt, and so does any changed bit.

Wrapped key (a row of ``_ls_keys``): 12-byte nonce + AES-GCM(key-encryption key,
32-byte key, associated data = store id + key id). The key-encryption key is
HKDF-SHA256 of the master key with the store id as salt, so one master key
wraps every store differently, and the master key itself is never stored.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

#: Format byte of an encrypted value without, and with, a blind-index tag.
FORMAT_ENCRYPTED = 0xE1
FORMAT_ENCRYPTED_TAGGED = 0xE2
#: Bytes of the (truncated) HMAC-SHA256 blind-index tag.
TAG_BYTES = 16
NONCE_BYTES = 12
KEY_BYTES = 32
_KID = struct.Struct(">I")
HEADER_BYTES = 1 + _KID.size + NONCE_BYTES
TAGGED_HEADER_BYTES = HEADER_BYTES + TAG_BYTES
#: Bytes an encrypted value adds to its plaintext (header and GCM tag), without a blind-index tag.
OVERHEAD = HEADER_BYTES + 16


class DecryptFailed(Exception):
    """Internal: authentication failed (wrong key, tampered bytes or wrong place); callers add context."""


def derive(secret: bytes, info: str, salt: bytes = b"", length: int = KEY_BYTES) -> bytes:
    """Derive a sub-key from a 32-byte secret with HKDF-SHA256 (done once per open, never per value)."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt or None, info=info.encode()).derive(secret)


def subkey(secret: bytes, label: str) -> bytes:
    """A cheap keyed derivation (HMAC-SHA256) for per-field and per-subject labels."""
    return hmac.new(secret, label.encode("utf-8"), hashlib.sha256).digest()


def wrap(kek: bytes, key: bytes, context: bytes) -> bytes:
    """Encrypt a 32-byte key under a key-encryption key; ``context`` is authenticated."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(kek).encrypt(nonce, key, context)


def unwrap(kek: bytes, wrapped: bytes, context: bytes) -> bytes:
    """Decrypt a key wrapped by ``wrap``; raise ``DecryptFailed`` if the kek or context is wrong."""
    try:
        return AESGCM(kek).decrypt(wrapped[:NONCE_BYTES], wrapped[NONCE_BYTES:], context)
    except (InvalidTag, ValueError):
        raise DecryptFailed() from None


def blind_tag(index_key: bytes, plaintext: bytes) -> bytes:
    """The truncated HMAC-SHA256 of a value: equal values give equal tags (the documented leak)."""
    return hmac.new(index_key, plaintext, hashlib.sha256).digest()[:TAG_BYTES]


def encrypt(cipher: AESGCM, key_id: int, plaintext: bytes, aad: bytes, tag: bytes | None = None) -> bytes:
    """Encrypt one value with a fresh random nonce; return the stored bytes (header + ciphertext)."""
    nonce = os.urandom(NONCE_BYTES)
    head = b"\xe1" + _KID.pack(key_id) if tag is None else b"\xe2" + tag + _KID.pack(key_id)
    # The header (format, tag, key id) is authenticated too, so no bit of the value can change unseen.
    return head + nonce + cipher.encrypt(nonce, plaintext, aad + head)


def key_id_of(stored: bytes) -> int:
    """The key id in an encrypted value's header; raise ``DecryptFailed`` if it has no valid header."""
    if len(stored) < OVERHEAD:
        raise DecryptFailed()
    fmt = stored[0]
    if fmt == FORMAT_ENCRYPTED:
        return int(_KID.unpack_from(stored, 1)[0])
    if fmt == FORMAT_ENCRYPTED_TAGGED and len(stored) >= OVERHEAD + TAG_BYTES:
        return int(_KID.unpack_from(stored, 1 + TAG_BYTES)[0])
    raise DecryptFailed()


def decrypt(cipher: AESGCM, stored: bytes, aad: bytes) -> bytes:
    """Decrypt the stored bytes of one value; raise ``DecryptFailed`` on any mismatch."""
    start = 1 + _KID.size if stored[0] == FORMAT_ENCRYPTED else 1 + TAG_BYTES + _KID.size
    try:
        return cipher.decrypt(stored[start : start + NONCE_BYTES], stored[start + NONCE_BYTES :], aad + stored[:start])
    except (InvalidTag, ValueError):
        raise DecryptFailed() from None


def aad_prefix(store_id: str, collection: str, field: str) -> bytes:
    """The part of the associated data shared by every value of one field of one store."""
    return f"ls1\x00{store_id}\x00{collection}\x00{field}\x00".encode()


def aad_for(prefix: bytes, key: object) -> bytes:
    """The associated data binding a value to (store id, collection, field, row key)."""
    if type(key) is str:
        return prefix + b"s" + key.encode("utf-8", "surrogatepass")
    return prefix + b"i" + str(key).encode()


def next_prefix(prefix: bytes) -> bytes | None:
    """The smallest byte string greater than every string starting with ``prefix`` (None if none)."""
    raw = bytearray(prefix)
    while raw:
        if raw[-1] < 0xFF:
            raw[-1] += 1
            return bytes(raw)
        raw.pop()
    return None
