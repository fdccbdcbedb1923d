"""Artifact rows: inserting them for verified blobs, and releasing them when unreferenced."""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import delete, exists, select
from sqlalchemy.orm import Session

from registry.catalog._tx import lock_object_key, transaction
from registry.catalog.errors import InvalidInputError, NotFoundError
from registry.models import ARTIFACT_KINDS, ARTIFACT_REFERENCES, Artifact
from registry.stores.base import ObjectStore, StoredObject


def add_artifact(session: Session, *, stored: StoredObject, kind: str) -> Artifact:
    """Insert the row of an uploaded, verified blob (inside the caller's transaction)."""
    if kind not in ARTIFACT_KINDS:
        raise InvalidInputError(f"unknown artifact kind {kind!r}", field="kind")
    if stored.sha256 is None:
        raise InvalidInputError(f"object {stored.key!r} has no verified sha256", field="sha256")
    lock_object_key(session, stored.key)  # a concurrent delete of this blob finishes first
    row = Artifact(object_key=stored.key, sha256=stored.sha256, size_bytes=stored.size, kind=kind)
    session.add(row)
    session.flush()
    return row


def get_artifact(session: Session, *, artifact_id: int) -> Artifact:
    """One artifact row by id (NotFoundError naming `artifact_id` if there is none)."""
    with transaction(session):
        row = session.get(Artifact, artifact_id)
    if row is None:
        raise NotFoundError(f"artifact {artifact_id} not found", field="artifact_id")
    return row


def artifact_is_referenced(session: Session, artifact_id: int) -> bool:
    """Whether any row (dataset, version, consolidation run) still points at the artifact."""
    return any(
        session.scalar(select(exists().where(column == artifact_id)))
        for _model, column in ARTIFACT_REFERENCES
    )


def release_artifacts(session: Session, artifact_ids: Iterable[int | None]) -> list[str]:
    """Delete the unreferenced ones among `artifact_ids` (caller's transaction); their keys."""
    keys = []
    for artifact_id in {a for a in artifact_ids if a is not None}:
        if artifact_is_referenced(session, artifact_id):
            continue
        key = session.scalar(select(Artifact.object_key).where(Artifact.id == artifact_id))
        session.execute(delete(Artifact).where(Artifact.id == artifact_id))
        if key is not None:
            keys.append(key)
    return keys


def delete_blob_if_unused(session: Session, store: ObjectStore, key: str) -> bool:
    """Delete the blob unless an artifact row names it; whether it was deleted.

    The check and the delete happen under the key's lock, so a publisher inserting a row for
    the same content either commits first (the blob stays) or finds it gone after its own
    commit and uploads it again (`registry.publish.ensure_stored`).
    """
    with transaction(session):
        lock_object_key(session, key)
        if session.scalar(select(exists().where(Artifact.object_key == key))):
            return False
        store.delete(key)
    return True


def delete_blobs_if_unused(session: Session, store: ObjectStore, keys: Iterable[str]) -> list[str]:
    """After commit: delete each blob no artifact row names any more; the deleted keys."""
    return [key for key in keys if delete_blob_if_unused(session, store, key)]
