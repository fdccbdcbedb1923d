"""API key generation and hashing: `dbk_<prefix>_<secret>`, stored as a sha256 only."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

KEY_MARKER = "dbk"
PREFIX_BYTES = 6
SECRET_BYTES = 24


@dataclass(frozen=True)
class NewKey:
    """A freshly generated key: the plaintext (shown once), its lookup prefix and hash."""

    plaintext: str
    prefix: str
    key_hash: str


def hash_key(key: str) -> str:
    """The sha256 hex digest under which a key is stored."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def generate_key() -> NewKey:
    """A new random key with a public prefix for lookup."""
    prefix = secrets.token_hex(PREFIX_BYTES)
    plaintext = f"{KEY_MARKER}_{prefix}_{secrets.token_urlsafe(SECRET_BYTES)}"
    return NewKey(plaintext=plaintext, prefix=prefix, key_hash=hash_key(plaintext))


def parse_prefix(key: str) -> str | None:
    """The lookup prefix of a well-formed key, or None for anything else."""
    parts = key.split("_", 2)
    if len(parts) != 3 or parts[0] != KEY_MARKER or len(parts[1]) != 2 * PREFIX_BYTES:
        return None
    if not all(c in "0123456789abcdef" for c in parts[1]) or not parts[2]:
        return None
    return parts[1]


def key_matches(key: str, key_hash: str) -> bool:
    """Whether `key` hashes to `key_hash` (constant-time comparison)."""
    return hmac.compare_digest(hash_key(key), key_hash)
