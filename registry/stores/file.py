"""Object store on a local directory: temp file + fsync + atomic link/rename, no path escapes."""

from __future__ import annotations

import hashlib
import io
import os
import secrets
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from registry.stores.base import (
    CHUNK_BYTES,
    Data,
    ObjectConflictError,
    ObjectNotFound,
    ObjectStore,
    StoredObject,
    check_digest,
    validate_key,
    validate_sha256,
)

TMP_DIR = ".tmp"


class FileStore(ObjectStore):
    """Objects as files under `root`; temp files live in `root/.tmp` and are never listed."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / TMP_DIR).mkdir(exist_ok=True)
        self.url = self.root.as_uri()

    def _path(self, key: str) -> Path:
        path = (self.root / validate_key(key)).resolve()
        if not path.is_relative_to(self.root) or path == self.root:
            raise ValueError(f"object key {key!r} escapes the store")  # symlinks in root
        return path

    def _write_temp(self, data: Data) -> tuple[Path, str, int]:
        tmp = self.root / TMP_DIR / f"{secrets.token_hex(8)}.part"
        digest = hashlib.sha256()
        size = 0
        stream = io.BytesIO(data) if isinstance(data, bytes | bytearray | memoryview) else data
        try:
            with open(tmp, "wb") as out:
                while chunk := stream.read(CHUNK_BYTES):
                    digest.update(chunk)
                    size += len(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return tmp, digest.hexdigest(), size

    @staticmethod
    def _fsync_dir(path: Path) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def put(self, key: str, data: Data, *, sha256: str | None = None) -> StoredObject:
        """Store `data` under an immutable key, verifying `sha256` when given."""
        path = self._path(key)
        if sha256 is not None:
            validate_sha256(sha256)
        tmp, actual, size = self._write_temp(data)
        try:
            if sha256 is not None:
                check_digest(key, sha256, actual)
            path.parent.mkdir(parents=True, exist_ok=True)
            os.chmod(tmp, 0o444)  # immutable content: read-only
            try:
                os.link(tmp, path)  # atomic and never overwrites
            except FileExistsError:
                existing = self._hash_file(path)
                if existing != actual:
                    raise ObjectConflictError(
                        f"object {key!r} already exists with different content "
                        f"(sha256 {existing}, new {actual})",
                        key=key,
                    ) from None
                os.utime(path)  # a re-put is fresh again for gc's grace period
            else:
                self._fsync_dir(path.parent)
        finally:
            tmp.unlink(missing_ok=True)
        return StoredObject(key=key, sha256=actual, size=size)

    @staticmethod
    def _hash_file(path: Path) -> str:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK_BYTES):
                digest.update(chunk)
        return digest.hexdigest()

    def head(self, key: str) -> StoredObject | None:
        """Size and sha256 of an object (hashed from the bytes on disk), or None if absent."""
        path = self._path(key)
        if not path.is_file():
            return None
        return StoredObject(key=key, sha256=self._hash_file(path), size=path.stat().st_size)

    def open(
        self, key: str, *, sha256: str, start: int = 0, end: int | None = None
    ) -> Iterator[bytes]:
        """Stream bytes [start, end); a full read is verified before the first byte is yielded."""
        path = self._path(key)
        validate_sha256(sha256)
        try:
            handle = open(path, "rb")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFound(f"object {key!r} not found in {self.url}", key=key) from None
        size = os.fstat(handle.fileno()).st_size
        if start < 0 or (end is not None and (end < start or end > size)) or start > size:
            handle.close()
            raise ValueError(f"byte range [{start}, {end}) outside object {key!r} of {size} bytes")
        if start == 0 and end in (None, size):
            digest = hashlib.sha256()
            while chunk := handle.read(CHUNK_BYTES):
                digest.update(chunk)
            try:
                check_digest(key, sha256, digest.hexdigest())
            except Exception:
                handle.close()
                raise
            handle.seek(0)
        return self._stream(handle, start, size if end is None else end)

    @staticmethod
    def _stream(handle: io.BufferedReader, start: int, end: int) -> Iterator[bytes]:
        with handle:
            handle.seek(start)
            remaining = end - start
            while remaining > 0:
                chunk = handle.read(min(CHUNK_BYTES, remaining))
                if not chunk:
                    break
                remaining -= len(chunk)
                yield chunk

    def delete(self, key: str) -> None:
        """Remove an object; absent objects are fine."""
        self._path(key).unlink(missing_ok=True)

    def list(self, prefix: str = "") -> Iterator[str]:
        """Every key starting with `prefix`, in sorted order."""
        keys = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            if Path(dirpath) == self.root and TMP_DIR in dirnames:
                dirnames.remove(TMP_DIR)
            rel_dir = Path(dirpath).relative_to(self.root).as_posix()
            for name in filenames:
                key = name if rel_dir == "." else f"{rel_dir}/{name}"
                if key.startswith(prefix):
                    keys.append(key)
        return iter(sorted(keys))

    def scan(self, prefix: str = "") -> Iterator[StoredObject]:
        """Every object under `prefix` with size and last-modified time (sha256 not read)."""
        for key in self.list(prefix):
            try:
                stat = self._path(key).stat()
            except FileNotFoundError:
                continue  # deleted meanwhile
            modified = datetime.fromtimestamp(stat.st_mtime, UTC)
            yield StoredObject(key=key, sha256=None, size=stat.st_size, modified_at=modified)

    def presign(self, key: str, expires_s: int = 3600) -> str | None:
        """A file store cannot hand out URLs: always None."""
        return None

    def _write_mutable(self, key: str, data: bytes) -> None:
        path = self._path(key)
        tmp, _, _ = self._write_temp(data)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, path)
            self._fsync_dir(path.parent)
        finally:
            tmp.unlink(missing_ok=True)

    def _read_mutable(self, key: str) -> bytes | None:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            return None
