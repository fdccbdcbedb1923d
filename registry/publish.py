"""The write order: upload the blob, verify it by reading back, then one transaction for the rows.

A failure before the commit leaves at most an orphan blob (removed by `gc`), never a row that
points at missing or wrong bytes. Blobs are content-addressed, so a delete of an identical,
unreferenced blob can race a publish; after its commit the publisher checks the blob is
still there and uploads it again if not (`ensure_stored`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy.orm import Session

from diffs.compose import compose_artifact_bytes
from registry import catalog
from registry.layouts import COMPOSED_SHA256_KEY, COMPOSED_SIZE_KEY
from registry.models import Dataset, TaskVersion
from registry.stores.base import Data, ObjectIntegrityError, ObjectStore, StoredObject, check_digest

T = TypeVar("T")

DATASETS_KIND = "datasets"
ARTIFACTS_KIND = "artifacts"
DIFF_SUFFIX = ".safetensors"


def upload_verified(
    store: ObjectStore, data: bytes, *, kind: str, suffix: str, sha256: str | None = None
) -> StoredObject:
    """Put `data` under its content key, then read back head/metadata and check sha256 and size."""
    actual = hashlib.sha256(data).hexdigest()
    key = store.content_key(kind, actual, suffix)
    if sha256 is not None:
        check_digest(key, sha256, actual)
    return _put_and_read_back(store, key, data, actual)


def ensure_stored(store: ObjectStore, stored: StoredObject, data: bytes) -> None:
    """After the commit: put the blob back if a racing delete of identical content removed it."""
    if store.head(stored.key) is None:
        # Restore exactly what the row records: `put` rejects `data` that does not hash to it.
        recorded = stored.sha256 or hashlib.sha256(data).hexdigest()  # put's records carry it
        _put_and_read_back(store, stored.key, data, recorded)


def _put_and_read_back(store: ObjectStore, key: str, data: bytes, sha256: str) -> StoredObject:
    """Put `data` (whose digest is `sha256`) under `key` and check what reads back."""
    stored = store.put(key, data, sha256=sha256)
    head = store.head(key)
    if head is None:
        raise ObjectIntegrityError(f"object {key!r} is missing right after upload", key=key)
    if head.sha256 != sha256 or head.size != len(data):
        raise ObjectIntegrityError(
            f"object {key!r} reads back as sha256 {head.sha256} ({head.size} bytes), "
            f"uploaded {sha256} ({len(data)} bytes)",
            key=key,
        )
    return stored


def publish_blob_then_row(
    store: ObjectStore,
    data: Data,
    *,
    write_rows: Callable[[StoredObject], T],
    kind: str = ARTIFACTS_KIND,
    suffix: str = DIFF_SUFFIX,
) -> T:
    """Upload + verify `data` (by default a diff), then call `write_rows(stored)`, which commits
    one transaction; after it, put the blob back if a racing delete removed it."""
    payload = data if isinstance(data, bytes) else data.read()
    stored = upload_verified(store, payload, kind=kind, suffix=suffix)
    rows = write_rows(stored)
    ensure_stored(store, stored, payload)
    return rows


def store_dataset(
    session: Session,
    store: ObjectStore,
    *,
    tenant_id: int,
    data: bytes,
    filename: str,
    format: str,
    rows: int,
    label_names: list[str],
    task_type: str,
    column_mapping: dict[str, Any],
) -> Dataset:
    """Upload a validated dataset file and publish its row."""
    suffix = "." + format if format.isalnum() else ""
    return publish_blob_then_row(
        store,
        data,
        kind=DATASETS_KIND,
        suffix=suffix,
        write_rows=lambda stored: catalog.create_dataset(
            session,
            tenant_id=tenant_id,
            stored=stored,
            filename=filename,
            format=format,
            rows=rows,
            label_names=label_names,
            task_type=task_type,
            column_mapping=column_mapping,
        ),
    )


def publish_version(
    session: Session,
    store: ObjectStore,
    *,
    task_id: int,
    diff_bytes: bytes,
    nnz: int,
    density: float,
    metrics: dict[str, Any],
    config: dict[str, Any],
    **version_fields: Any,
) -> TaskVersion:
    """Upload + verify a diff, then publish the next task version.

    `version_fields` go to `catalog.publish_task_version` (source_job_id, consolidation_run_id,
    parent_version_id, shared_artifact_id, composed_on_request, activate, label_names,
    finish_job_id, worker_id).
    """
    return publish_blob_then_row(
        store,
        diff_bytes,
        write_rows=lambda diff: catalog.publish_task_version(
            session,
            task_id=task_id,
            diff=diff,
            nnz=nnz,
            density=density,
            metrics=metrics,
            config=config,
            **version_fields,
        ),
    )


def publish_consolidated_version(
    session: Session,
    store: ObjectStore,
    *,
    task_id: int,
    residual_bytes: bytes,
    shared_artifact_id: int,
    nnz: int,
    density: float,
    metrics: dict[str, Any],
    config: dict[str, Any],
    shared_bytes: bytes | None = None,
    **version_fields: Any,
) -> TaskVersion:
    """Upload + verify a consolidated task's residual, its only blob, then publish the version.

    The version references the run's shared artifact (stored once for all its tasks); its
    composed diff is built on request (`diffs.compose`), and its sha256 and size are
    recorded in `config` now, so listings and downloads agree without composing.
    `shared_bytes`: the shared blob if the caller holds it (checked against the artifact), else
    it is read from the store. `version_fields`: as for `publish_version`
    (consolidation_run_id, parent_version_id, activate, ...).
    """
    shared = catalog.get_artifact(session, artifact_id=shared_artifact_id)
    if shared_bytes is None:
        shared_bytes = store.get(shared.object_key, sha256=shared.sha256)
    else:
        check_digest(shared.object_key, shared.sha256, hashlib.sha256(shared_bytes).hexdigest())
    composed = compose_artifact_bytes(shared_bytes, residual_bytes)
    recorded = {
        COMPOSED_SHA256_KEY: hashlib.sha256(composed).hexdigest(),
        COMPOSED_SIZE_KEY: len(composed),
    }
    return publish_version(
        session,
        store,
        task_id=task_id,
        diff_bytes=residual_bytes,
        nnz=nnz,
        density=density,
        metrics=metrics,
        config={**config, **recorded},
        shared_artifact_id=shared_artifact_id,
        composed_on_request=True,
        **version_fields,
    )


def publish_shared_diff(session: Session, store: ObjectStore, *, run_id: int, data: bytes) -> int:
    """Upload + verify a consolidation run's shared diff and attach it; the artifact id."""
    return publish_blob_then_row(
        store,
        data,
        write_rows=lambda stored: (
            catalog.set_shared_artifact(session, run_id=run_id, stored=stored).id
        ),
    )
