"""Datasets: uploaded, validated tables of a tenant."""

from __future__ import annotations

from typing import Any

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from registry.catalog._ids import get_row
from registry.catalog._tx import transaction
from registry.catalog.artifacts import add_artifact, delete_blobs_if_unused, release_artifacts
from registry.catalog.errors import ConflictError, NotFoundError
from registry.catalog.pagination import paginate
from registry.models import FINISHED_JOB_STATES, Dataset, Job
from registry.stores.base import ObjectStore, StoredObject


def create_dataset(
    session: Session,
    *,
    tenant_id: int,
    stored: StoredObject,
    filename: str,
    format: str,
    rows: int,
    label_names: list[str],
    task_type: str,
    column_mapping: dict[str, Any],
) -> Dataset:
    """Insert the artifact of an uploaded, verified file and its dataset row in one transaction."""
    with transaction(session):
        artifact = add_artifact(session, stored=stored, kind="dataset")
        row = Dataset(
            tenant_id=tenant_id,
            filename=filename,
            format=format,
            sha256=artifact.sha256,
            size_bytes=artifact.size_bytes,
            artifact=artifact,
            rows=rows,
            label_names=list(label_names),
            task_type=task_type,
            column_mapping=dict(column_mapping),
        )
        session.add(row)
        session.flush()
    return row


def get_dataset(session: Session, *, tenant_id: int, dataset_id: int) -> Dataset:
    """The tenant's dataset `dataset_id`, or NotFoundError."""
    with transaction(session):
        row = get_row(session, Dataset, dataset_id)
    if row is None or row.tenant_id != tenant_id:
        raise NotFoundError(f"dataset {dataset_id} not found", field="dataset_id")
    return row


def list_datasets(
    session: Session, *, tenant_id: int, cursor: str | None = None, limit: int = 50
) -> tuple[list[Dataset], str | None]:
    """A page of the tenant's datasets, newest first, and the cursor of the next page."""
    with transaction(session):
        query = select(Dataset).where(Dataset.tenant_id == tenant_id)
        return paginate(session, query, Dataset.id, cursor=cursor, limit=limit)


def delete_dataset(
    session: Session, store: ObjectStore, *, tenant_id: int, dataset_id: int
) -> None:
    """Delete a dataset and, if nothing else uses the same bytes, its blob.

    Refused (ConflictError) while an unfinished job reads it.
    """
    with transaction(session):
        # The row lock first: a job being created on it (which holds a share lock) commits
        # before the check below, so it is seen busy instead of failing its foreign key.
        row = get_row(session, Dataset, dataset_id, with_for_update={"of": Dataset})
        if row is None or row.tenant_id != tenant_id:
            raise NotFoundError(f"dataset {dataset_id} not found", field="dataset_id")
        busy = session.scalar(
            select(Job.id).where(
                or_(Job.dataset_id == dataset_id, Job.validation_dataset_id == dataset_id),
                Job.state.not_in(FINISHED_JOB_STATES),
            )
        )
        if busy is not None:
            raise ConflictError(
                f"dataset {dataset_id} is used by unfinished job {busy}",
                field="dataset_id",
                code="dataset_in_use",
            )
        artifact_id = row.artifact_id
        session.delete(row)
        session.flush()
        keys = release_artifacts(session, [artifact_id])
    delete_blobs_if_unused(session, store, keys)
