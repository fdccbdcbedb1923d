"""Garbage collection: remove blobs no row references, and checkpoints of finished jobs.

Only content-addressed blobs (`<kind>/ab/cd/<sha256>...`) and job checkpoints
(`checkpoints/jobs/<id>/...`) are ever candidates; anything else in the store is left alone.
Blobs younger than the grace period are kept: they may belong to a publish in progress
(upload done, row not yet committed).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from registry.catalog import transaction
from registry.catalog.artifacts import delete_blob_if_unused, release_artifacts
from registry.models import FINISHED_JOB_STATES, Artifact, Job, utcnow
from registry.stores.base import (
    CHECKPOINT_PREFIX,
    ObjectStore,
    checkpoint_job_id,
    is_content_key,
)

DEFAULT_GRACE_S = 3600.0
UPLOAD_TEMP_GLOB = "upload-*"  # the prefix api/uploads.py gives its temp files


@dataclass
class GcReport:
    """What a gc pass removed (or would remove, with dry_run) and what it kept."""

    dry_run: bool
    deleted_blobs: list[str] = field(default_factory=list)
    deleted_checkpoints: list[str] = field(default_factory=list)
    deleted_artifact_rows: list[int] = field(default_factory=list)
    kept_young_blobs: list[str] = field(default_factory=list)
    deleted_uploads: list[str] = field(default_factory=list)
    scanned: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready form."""
        return asdict(self)


def gc(
    session: Session,
    store: ObjectStore,
    *,
    dry_run: bool = False,
    grace_s: float = DEFAULT_GRACE_S,
    upload_dir: Path | None = None,
) -> GcReport:
    """Remove orphan blobs (older than `grace_s`), artifact rows nothing references,
    checkpoints of finished or vanished jobs, and upload temp files (older than `grace_s`)
    that a crashed API left in `upload_dir`. Never touches anything else."""
    report = GcReport(dry_run=dry_run)
    if upload_dir is not None:
        report.deleted_uploads = remove_stale_uploads(upload_dir, grace_s=grace_s, dry_run=dry_run)
    cutoff = utcnow() - timedelta(seconds=grace_s)

    # Artifact rows no dataset/version/run points at (e.g. left by a failed release).
    with transaction(session):
        artifact_ids = list(
            session.scalars(select(Artifact.id).where(Artifact.created_at < cutoff))
        )
        if dry_run:
            from registry.catalog.artifacts import artifact_is_referenced

            report.deleted_artifact_rows = [
                a for a in artifact_ids if not artifact_is_referenced(session, a)
            ]
        else:
            before = set(session.scalars(select(Artifact.id)))
            release_artifacts(session, artifact_ids)
            after = set(session.scalars(select(Artifact.id)))
            report.deleted_artifact_rows = sorted(before - after)

    with transaction(session):
        referenced = set(session.scalars(select(Artifact.object_key)))
        if dry_run and report.deleted_artifact_rows:
            gone = session.scalars(
                select(Artifact.object_key).where(Artifact.id.in_(report.deleted_artifact_rows))
            )
            referenced -= set(gone)
        job_states = dict(session.execute(select(Job.id, Job.state)).tuples().all())

    for obj in store.scan():
        report.scanned += 1
        key = obj.key
        if key.startswith(CHECKPOINT_PREFIX):
            job_id = checkpoint_job_id(key)
            if job_id is None:
                continue
            state = job_states.get(job_id) or _job_state(session, job_id)
            if state is None or state in FINISHED_JOB_STATES:
                report.deleted_checkpoints.append(key)
                if not dry_run:
                    store.delete(key)
            continue
        if not is_content_key(key) or key in referenced:
            continue
        if obj.modified_at is not None and obj.modified_at > cutoff:
            report.kept_young_blobs.append(key)
            continue
        if dry_run:
            report.deleted_blobs.append(key)
        elif delete_blob_if_unused(session, store, key):  # a row may have named it since
            report.deleted_blobs.append(key)
    return report


def _job_state(session: Session, job_id: int) -> str | None:
    # A job newer than the snapshot above may already have a checkpoint: ask again.
    with transaction(session):
        return session.scalar(select(Job.state).where(Job.id == job_id))


def remove_stale_uploads(upload_dir: Path, *, grace_s: float, dry_run: bool = False) -> list[str]:
    """Delete upload temp files older than `grace_s` (an upload in flight is younger)."""
    cutoff = time.time() - grace_s
    removed: list[str] = []
    for path in sorted(Path(upload_dir).glob(UPLOAD_TEMP_GLOB)):
        try:
            if not path.is_file() or path.stat().st_mtime > cutoff:
                continue
            if not dry_run:
                path.unlink()
        except FileNotFoundError:
            continue  # its upload finished and removed it meanwhile
        removed.append(str(path))
    return removed
