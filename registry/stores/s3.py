"""Object store on S3 or an S3-compatible server (MinIO, moto): sha256 kept in object metadata."""

from __future__ import annotations

import hashlib
import io
import tempfile
from collections.abc import Iterator
from typing import Any

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
from settings import Settings

SHA256_METADATA = "sha256"
SPOOL_BYTES = 8 * 1024 * 1024


def make_s3_client(settings: Settings) -> Any:
    """A boto3 S3 client with explicit retries and checksums only when required."""
    import boto3
    from botocore.config import Config

    config = Config(
        retries={"max_attempts": settings.s3_max_attempts, "mode": "standard"},
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        s3={"addressing_style": "path"} if settings.s3_endpoint_url else {},
    )
    return boto3.session.Session().client(
        "s3",
        endpoint_url=settings.s3_endpoint_url or None,
        region_name=settings.s3_region or None,
        config=config,
    )


def _is_not_found(exc: Exception) -> bool:
    from botocore.exceptions import ClientError

    if not isinstance(exc, ClientError):
        return False
    code = str(exc.response.get("Error", {}).get("Code", ""))
    return code in ("404", "NoSuchKey", "NotFound")


class S3Store(ObjectStore):
    """Objects under `s3://bucket/prefix`; uploads above the threshold go multipart."""

    def __init__(self, bucket: str, prefix: str = "", *, settings: Settings) -> None:
        from boto3.s3.transfer import TransferConfig

        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.url = f"s3://{bucket}/{self.prefix}"
        self.client = make_s3_client(settings)
        self.transfer_config = TransferConfig(
            multipart_threshold=settings.s3_multipart_threshold_bytes,
            multipart_chunksize=max(settings.s3_multipart_threshold_bytes, 5 * 1024 * 1024),
        )

    def _full(self, key: str) -> str:
        return self.prefix + validate_key(key)

    def put(self, key: str, data: Data, *, sha256: str | None = None) -> StoredObject:
        """Store `data` under an immutable key, verifying `sha256` when given."""
        full = self._full(key)
        if sha256 is not None:
            validate_sha256(sha256)
        with tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES) as spool:
            stream = io.BytesIO(data) if isinstance(data, bytes | bytearray | memoryview) else data
            digest = hashlib.sha256()
            size = 0
            while chunk := stream.read(CHUNK_BYTES):
                digest.update(chunk)
                size += len(chunk)
                spool.write(chunk)
            actual = digest.hexdigest()
            if sha256 is not None:
                check_digest(key, sha256, actual)
            existing = self.head(key)
            if existing is not None and existing.sha256 != actual:
                raise ObjectConflictError(
                    f"object {key!r} already exists with different content "
                    f"(sha256 {existing.sha256}, new {actual})",
                    key=key,
                )
            # Same content is uploaded again: identical bytes, and a fresh LastModified keeps
            # the object inside gc's grace period while its row is being committed.
            spool.seek(0)
            self.client.upload_fileobj(
                spool,
                self.bucket,
                full,
                ExtraArgs={"Metadata": {SHA256_METADATA: actual}},
                Config=self.transfer_config,
            )
        return StoredObject(key=key, sha256=actual, size=size)

    def head(self, key: str) -> StoredObject | None:
        """Size and recorded sha256 (object metadata) of an object, or None if absent."""
        try:
            response = self.client.head_object(Bucket=self.bucket, Key=self._full(key))
        except Exception as exc:
            if _is_not_found(exc):
                return None
            raise
        return StoredObject(
            key=key,
            sha256=response.get("Metadata", {}).get(SHA256_METADATA),
            size=int(response["ContentLength"]),
        )

    def _get_object(self, key: str, **kwargs: Any) -> Any:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._full(key), **kwargs)
        except Exception as exc:
            if _is_not_found(exc):
                raise ObjectNotFound(f"object {key!r} not found in {self.url}", key=key) from None
            raise

    def open(
        self, key: str, *, sha256: str, start: int = 0, end: int | None = None
    ) -> Iterator[bytes]:
        """Stream bytes [start, end); a full read is spooled and verified before any byte."""
        validate_sha256(sha256)
        if start < 0 or (end is not None and end < start):
            raise ValueError(f"bad byte range [{start}, {end}) for object {key!r}")
        if start == 0 and end is None:
            return self._verified_stream(key, sha256)
        if end == start:
            return iter(())
        byte_range = f"bytes={start}-" if end is None else f"bytes={start}-{end - 1}"
        body = self._get_object(key, Range=byte_range)["Body"]
        return self._body_chunks(body)

    def _verified_stream(self, key: str, sha256: str) -> Iterator[bytes]:
        body = self._get_object(key)["Body"]
        spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)
        digest = hashlib.sha256()
        try:
            for chunk in self._body_chunks(body):
                digest.update(chunk)
                spool.write(chunk)
            check_digest(key, sha256, digest.hexdigest())
        except BaseException:
            spool.close()
            raise
        spool.seek(0)
        return self._spool_chunks(spool)

    @staticmethod
    def _spool_chunks(spool: Any) -> Iterator[bytes]:
        with spool:
            while chunk := spool.read(CHUNK_BYTES):
                yield chunk

    @staticmethod
    def _body_chunks(body: Any) -> Iterator[bytes]:
        try:
            yield from body.iter_chunks(CHUNK_BYTES)
        finally:
            body.close()

    def get(self, key: str, *, sha256: str) -> bytes:
        """All bytes of an object, verified against `sha256`."""
        validate_sha256(sha256)
        body = self._get_object(key)["Body"]
        try:
            data = body.read()
        finally:
            body.close()
        check_digest(key, sha256, hashlib.sha256(data).hexdigest())
        return data

    def delete(self, key: str) -> None:
        """Remove an object; absent objects are fine."""
        self.client.delete_object(Bucket=self.bucket, Key=self._full(key))

    def list(self, prefix: str = "") -> Iterator[str]:
        """Every key starting with `prefix`, in S3's (lexical) order."""
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + prefix):
            for item in page.get("Contents", []):
                yield item["Key"][len(self.prefix) :]

    def scan(self, prefix: str = "") -> Iterator[StoredObject]:
        """Every object under `prefix` with size and last-modified time (sha256 not read)."""
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + prefix):
            for item in page.get("Contents", []):
                yield StoredObject(
                    key=item["Key"][len(self.prefix) :],
                    sha256=None,
                    size=int(item["Size"]),
                    modified_at=item["LastModified"],
                )

    def presign(self, key: str, expires_s: int = 3600) -> str | None:
        """A presigned GET URL valid for `expires_s` seconds."""
        return self.client.generate_presigned_url(
            "get_object",
            Params={"Bucket": self.bucket, "Key": self._full(key)},
            ExpiresIn=int(expires_s),
        )

    def _write_mutable(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._full(key), Body=data)

    def _read_mutable(self, key: str) -> bytes | None:
        try:
            body = self._get_object(key)["Body"]
        except ObjectNotFound:
            return None
        try:
            return body.read()
        finally:
            body.close()


__all__ = ["S3Store", "make_s3_client"]
