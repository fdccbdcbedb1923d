"""The object-store contract: content-addressed immutable blobs plus a mutable checkpoint area."""

from __future__ import annotations

import abc
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import BinaryIO

CHUNK_BYTES = 1024 * 1024
CHECKPOINT_PREFIX = "checkpoints/"
MAX_KEY_CHARS = 1024
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_KIND_RE = re.compile(r"^[a-z0-9][a-z0-9-]*$")
_SUFFIX_RE = re.compile(r"^(\.[A-Za-z0-9]+)*$")

Data = bytes | BinaryIO


class ObjectStoreError(Exception):
    """Base class of object-store failures; the message names the key."""

    def __init__(self, message: str, *, key: str) -> None:
        super().__init__(message)
        self.key = key


class ObjectNotFound(ObjectStoreError, KeyError):
    """No object is stored under the key."""

    def __str__(self) -> str:
        return str(self.args[0])


class ObjectIntegrityError(ObjectStoreError):
    """Stored or uploaded bytes do not hash to the sha256 they should have."""


class ObjectConflictError(ObjectStoreError):
    """Different content was put under an existing immutable key."""


class InvalidObjectKey(ObjectStoreError, ValueError):
    """A key that could escape the store or is not a plain relative path."""


@dataclass(frozen=True)
class StoredObject:
    """What the store knows about one object."""

    key: str
    sha256: str | None
    size: int
    modified_at: datetime | None = None


def validate_key(key: str) -> str:
    """Return `key` if it is a safe relative key, else raise InvalidObjectKey."""
    problem = None
    if not isinstance(key, str) or not key:
        problem = "is empty"
    elif len(key) > MAX_KEY_CHARS:
        problem = f"is longer than {MAX_KEY_CHARS} characters"
    elif "\x00" in key:
        problem = "contains a NUL character"
    elif "\\" in key:
        problem = "contains a backslash"
    elif key.startswith("/") or re.match(r"^[A-Za-z]:", key):
        problem = "is absolute"
    elif any(part in ("", ".", "..") for part in key.split("/")):
        problem = "has an empty, '.' or '..' path segment"
    elif any(part.startswith(".tmp") for part in key.split("/")):
        problem = "uses the reserved '.tmp' name"
    if problem:
        raise InvalidObjectKey(f"object key {key!r} {problem}", key=str(key))
    return key


def validate_sha256(sha256: str) -> str:
    """Return a lowercase hex sha256 or raise ValueError."""
    if not isinstance(sha256, str) or not _SHA256_RE.match(sha256):
        raise ValueError(f"not a sha256 hex digest: {sha256!r}")
    return sha256


def content_key(kind: str, sha256: str, suffix: str = "") -> str:
    """The immutable key of content: `<kind>/<ab>/<cd>/<sha256><suffix>`."""
    if not _KIND_RE.match(kind):
        raise ValueError(f"bad object kind {kind!r}")
    if not _SUFFIX_RE.match(suffix):
        raise ValueError(f"bad object suffix {suffix!r}")
    validate_sha256(sha256)
    return f"{kind}/{sha256[:2]}/{sha256[2:4]}/{sha256}{suffix}"


def checkpoint_key(job_id: int, name: str = "state.pt") -> str:
    """The mutable key of a job's checkpoint: `checkpoints/jobs/<job_id>/<name>`."""
    return validate_key(f"{CHECKPOINT_PREFIX}jobs/{int(job_id)}/{name}")


def checkpoint_job_id(key: str) -> int | None:
    """The job id a checkpoint key belongs to, or None if the key is not a job checkpoint."""
    match = re.match(r"^checkpoints/jobs/(\d+)/", key)
    return int(match.group(1)) if match else None


CONTENT_KEY_RE = re.compile(
    r"^[a-z0-9][a-z0-9-]*/[0-9a-f]{2}/[0-9a-f]{2}/([0-9a-f]{64})(\.[A-Za-z0-9]+)*$"
)


def is_content_key(key: str) -> bool:
    """Whether `key` has the shape `content_key` gives (and its directories match the sha)."""
    match = CONTENT_KEY_RE.match(key)
    if not match:
        return False
    sha = match.group(1)
    parts = key.split("/")
    return parts[1] == sha[:2] and parts[2] == sha[2:4]


def check_digest(key: str, expected: str, actual: str) -> None:
    """Raise ObjectIntegrityError naming `key` when the digests differ."""
    if expected != actual:
        raise ObjectIntegrityError(
            f"object {key!r} failed its integrity check: expected sha256 {expected}, got {actual}",
            key=key,
        )


def _mutable_key(key: str) -> str:
    validate_key(key)
    if not key.startswith(CHECKPOINT_PREFIX):
        raise InvalidObjectKey(
            f"mutable object key {key!r} must start with {CHECKPOINT_PREFIX!r}", key=key
        )
    return key


class ObjectStore(abc.ABC):
    """Blobs by key. Content keys are immutable; only `checkpoints/` may be overwritten."""

    url: str

    @abc.abstractmethod
    def put(self, key: str, data: Data, *, sha256: str | None = None) -> StoredObject:
        """Store `data` under an immutable key, verifying `sha256` when given."""

    @abc.abstractmethod
    def head(self, key: str) -> StoredObject | None:
        """Size and recorded sha256 of an object, or None if absent."""

    @abc.abstractmethod
    def open(
        self, key: str, *, sha256: str, start: int = 0, end: int | None = None
    ) -> Iterator[bytes]:
        """Stream bytes [start, end) of an object; a full read is verified before any byte."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove an object; absent objects are fine."""

    @abc.abstractmethod
    def list(self, prefix: str = "") -> Iterator[str]:
        """Every key starting with `prefix`."""

    @abc.abstractmethod
    def scan(self, prefix: str = "") -> Iterator[StoredObject]:
        """Every object under `prefix` with size and last-modified time (sha256 not read)."""

    @abc.abstractmethod
    def presign(self, key: str, expires_s: int = 3600) -> str | None:
        """A time-limited GET URL, or None when the store cannot make one."""

    @abc.abstractmethod
    def _write_mutable(self, key: str, data: bytes) -> None: ...

    @abc.abstractmethod
    def _read_mutable(self, key: str) -> bytes | None: ...

    def get(self, key: str, *, sha256: str) -> bytes:
        """All bytes of an object, verified against `sha256`."""
        data = b"".join(self.open(key, sha256=sha256))
        return data

    def put_mutable(self, key: str, data: bytes) -> None:
        """Write (or overwrite) a checkpoint under `checkpoints/`."""
        self._write_mutable(_mutable_key(key), bytes(data))

    def get_mutable(self, key: str) -> bytes | None:
        """Read a checkpoint under `checkpoints/`, or None if there is none."""
        return self._read_mutable(_mutable_key(key))

    content_key = staticmethod(content_key)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"
