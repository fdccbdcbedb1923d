"""Object stores chosen by URL scheme: `file:///path` and `s3://bucket/prefix`."""

from __future__ import annotations

from urllib.parse import unquote, urlparse

from registry.stores.base import (
    CHECKPOINT_PREFIX,
    InvalidObjectKey,
    ObjectConflictError,
    ObjectIntegrityError,
    ObjectNotFound,
    ObjectStore,
    ObjectStoreError,
    StoredObject,
    checkpoint_job_id,
    checkpoint_key,
    content_key,
)
from registry.stores.file import FileStore
from settings import Settings, get_settings


def open_store(url: str | None = None, settings: Settings | None = None) -> ObjectStore:
    """The object store for `url` (default: the configured store URL)."""
    settings = settings or get_settings()
    url = url or settings.store_url
    parsed = urlparse(url)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise ValueError(f"file store URL must be file:///absolute/path, got {url!r}")
        return FileStore(unquote(parsed.path))
    if parsed.scheme == "s3":
        from registry.stores.s3 import S3Store

        if not parsed.netloc:
            raise ValueError(f"S3 store URL must be s3://bucket[/prefix], got {url!r}")
        return S3Store(parsed.netloc, unquote(parsed.path), settings=settings)
    raise ValueError(
        f"unsupported object store URL {url!r}: use file:///path or s3://bucket/prefix"
    )


__all__ = [
    "CHECKPOINT_PREFIX",
    "FileStore",
    "InvalidObjectKey",
    "ObjectConflictError",
    "ObjectIntegrityError",
    "ObjectNotFound",
    "ObjectStore",
    "ObjectStoreError",
    "StoredObject",
    "checkpoint_job_id",
    "checkpoint_key",
    "content_key",
    "open_store",
]
