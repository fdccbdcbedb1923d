"""Tasks and their versions: monotonic numbers, the active version, rollback, deletion."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from registry.catalog._ids import get_row, in_id_range
from registry.catalog._names import is_task_name
from registry.catalog._tx import get_or_create, transaction
from registry.catalog.artifacts import add_artifact, delete_blobs_if_unused, release_artifacts
from registry.catalog.epoch import bump_change_epoch
from registry.catalog.errors import ConflictError, InvalidInputError, NotFoundError
from registry.catalog.jobs import record_job_end
from registry.catalog.pagination import paginate
from registry.layouts import SINGLE, layout_of
from registry.models import Artifact, BaseModel, Job, Task, TaskVersion
from registry.stores.base import ObjectStore, StoredObject

TASK_TYPES = ("classification", "pair-classification", "regression")


def check_task_name(name: str) -> str:
    """`name` if it is a valid task name (letters, digits, `._-`, max 128), else InvalidInputError."""
    if not is_task_name(name):
        raise InvalidInputError(
            f"task name {name!r} must start with a letter or digit and use only letters, digits, "
            "'.', '_' or '-' (at most 128 characters)",
            field="task",
        )
    return name


def get_or_create_task(
    session: Session,
    *,
    tenant_id: int,
    name: str,
    base_model_id: int,
    task_type: str,
    label_names: list[str],
) -> Task:
    """The tenant's task `name`, created on first use; a different base or task type is refused."""
    check_task_name(name)
    if task_type not in TASK_TYPES:
        raise InvalidInputError(f"unknown task type {task_type!r}", field="task_type")
    if not in_id_range(base_model_id):
        raise NotFoundError(f"base model {base_model_id} not found", field="base_model")
    task = get_or_create(
        session,
        lambda: session.scalar(select(Task).where(Task.tenant_id == tenant_id, Task.name == name)),
        lambda: Task(
            tenant_id=tenant_id,
            name=name,
            base_model_id=base_model_id,
            task_type=task_type,
            label_names=list(label_names),
        ),
    )
    if task.base_model_id != base_model_id:
        raise ConflictError(
            f"task {name!r} is on base model {task.base_model.name!r}",
            field="base_model",
            code="base_model_mismatch",
        )
    if task.task_type != task_type:
        raise ConflictError(
            f"task {name!r} is a {task.task_type} task, not {task_type}",
            field="task_type",
            code="task_type_mismatch",
        )
    return task


def _task(session: Session, tenant_id: int, name: str, *, lock: bool = False) -> Task:
    if not is_task_name(name):  # e.g. a NUL: no task has it, and it never reaches the database
        raise NotFoundError(f"task {name[:140]!r} not found", field="task")
    query = select(Task).where(Task.tenant_id == tenant_id, Task.name == name)
    if lock:
        query = query.with_for_update(of=Task)
    task = session.scalar(query)
    if task is None:
        raise NotFoundError(f"task {name!r} not found", field="task")
    return task


def get_task(session: Session, *, tenant_id: int, name: str) -> Task:
    """The tenant's task `name`, or NotFoundError."""
    with transaction(session):
        return _task(session, tenant_id, name)


def list_tasks(
    session: Session,
    *,
    tenant_id: int,
    base_model: str | None = None,
    cursor: str | None = None,
    limit: int = 50,
) -> tuple[list[Task], str | None]:
    """A page of the tenant's tasks (optionally on one base model), newest first."""
    with transaction(session):
        query = select(Task).where(Task.tenant_id == tenant_id)
        if base_model is not None:
            query = query.join(BaseModel, Task.base_model_id == BaseModel.id).where(
                BaseModel.name == base_model
            )
        return paginate(session, query, Task.id, cursor=cursor, limit=limit)


def get_task_version(
    session: Session, *, tenant_id: int, name: str, number: int | None = None
) -> TaskVersion:
    """Version `number` of a task, or its active version when `number` is None."""
    with transaction(session):
        return _version(session, _task(session, tenant_id, name), number)


def _version(session: Session, task: Task, number: int | None) -> TaskVersion:
    if number is None:
        if task.active_version is None:
            raise NotFoundError(f"task {task.name!r} has no active version", field="version")
        number = task.active_version
    if not in_id_range(number):
        raise NotFoundError(f"task {task.name!r} has no version {number}", field="version")
    version = session.scalar(
        select(TaskVersion).where(TaskVersion.task_id == task.id, TaskVersion.number == number)
    )
    if version is None:
        raise NotFoundError(f"task {task.name!r} has no version {number}", field="version")
    return version


@dataclass(frozen=True)
class ServedVersion:
    """What predicting with a task version needs, detached from any session (safe to cache)."""

    task_type: str
    base_source: str
    number: int
    # (object_key, sha256) of each stored diff to apply: the shared one first when consolidated.
    artifacts: tuple[tuple[str, str], ...]


def resolve_served_version(
    session: Session, *, tenant_id: int, name: str, number: int | None = None
) -> ServedVersion:
    """Version `number` (default: the active one) of a task as served, or NotFoundError."""
    with transaction(session):
        task = _task(session, tenant_id, name)
        version = _version(session, task, number)
        if layout_of(version) == SINGLE:
            parts = [version.artifact]
        else:
            parts = [version.shared_artifact, version.residual_artifact]
        return ServedVersion(
            task_type=task.task_type,
            base_source=task.base_model.source,
            number=version.number,
            artifacts=tuple((a.object_key, a.sha256) for a in parts),
        )


def list_task_versions(session: Session, *, tenant_id: int, name: str) -> list[TaskVersion]:
    """Every version of a task, oldest first."""
    with transaction(session):
        task = _task(session, tenant_id, name)
        return list(
            session.scalars(
                select(TaskVersion)
                .where(TaskVersion.task_id == task.id)
                .order_by(TaskVersion.number)
            ).unique()
        )


def _next_version_number(session: Session, task_id: int) -> int:
    # One atomic increment: PostgreSQL row-locks the task until commit (concurrent publishers
    # queue up); SQLite holds the database write lock (BEGIN IMMEDIATE). UNIQUE(task_id,
    # number) backs it up. The counter never goes down, so deleted numbers are never reused.
    if not in_id_range(task_id):
        raise NotFoundError(f"task {task_id} not found", field="task")
    table = Task.__table__
    number = session.scalar(
        update(table)
        .where(table.c.id == task_id)
        .values(last_version_number=table.c.last_version_number + 1)
        .returning(table.c.last_version_number)
    )
    if number is None:
        raise NotFoundError(f"task {task_id} not found", field="task")
    return int(number)


def publish_task_version(
    session: Session,
    *,
    task_id: int,
    diff: StoredObject,
    nnz: int,
    density: float,
    metrics: dict[str, Any],
    config: dict[str, Any],
    source_job_id: int | None = None,
    consolidation_run_id: int | None = None,
    parent_version_id: int | None = None,
    shared_artifact_id: int | None = None,
    composed_on_request: bool = False,
    activate: bool = True,
    label_names: list[str] | None = None,
    finish_job_id: int | None = None,
    worker_id: str | None = None,
) -> TaskVersion:
    """Insert the artifact of an uploaded, verified diff and the next version in one transaction.

    With `composed_on_request`, `diff` is the version's residual and its only blob: one artifact
    row serves as both `artifact` and `residual_artifact` (`registry.layouts`), beside the run's
    `shared_artifact_id`. With `finish_job_id`, the same transaction moves that job from running to succeeded
    (pointing at the new version); if the job is no longer running nothing is published
    (ConflictError code `job_not_running`).
    """
    with transaction(session):
        number = _next_version_number(session, task_id)
        task = get_row(session, Task, task_id, populate_existing=True)
        assert task is not None
        if composed_on_request:
            if shared_artifact_id is None:
                raise InvalidInputError(
                    "a version composed on request stores one residual blob and needs the "
                    "shared artifact",
                    field="shared_artifact_id",
                )
            artifact = add_artifact(session, stored=diff, kind="residual-diff")
            residual_artifact = artifact
        else:
            artifact = add_artifact(session, stored=diff, kind="diff")
            residual_artifact = None
        if (
            shared_artifact_id is not None
            and get_row(session, Artifact, shared_artifact_id) is None
        ):
            raise NotFoundError(
                f"shared artifact {shared_artifact_id} not found", field="shared_artifact_id"
            )
        version = TaskVersion(
            task_id=task_id,
            number=number,
            metrics=dict(metrics),
            config=dict(config),
            nnz=int(nnz),
            density=float(density),
            source_job_id=source_job_id,
            consolidation_run_id=consolidation_run_id,
            parent_version_id=parent_version_id,
            artifact=artifact,
            residual_artifact=residual_artifact,
            shared_artifact_id=shared_artifact_id,
        )
        session.add(version)
        session.flush()
        if activate:
            task.active_version = number
        if label_names is not None:
            task.label_names = list(label_names)
        if finish_job_id is not None:
            finished = record_job_end(
                session,
                job_id=finish_job_id,
                state="succeeded",
                worker_id=worker_id,
                metrics=dict(metrics),
                result_version_id=version.id,
            )
            if finished is None:
                raise ConflictError(
                    f"job {finish_job_id} is no longer running; version not published",
                    field="job_id",
                    code="job_not_running",
                )
        session.flush()
        session.refresh(version)
        bump_change_epoch(session)  # last: the epoch row stays locked only until commit
    return version


def activate_version(session: Session, *, tenant_id: int, name: str, number: int) -> Task:
    """Make version `number` the one served (rollback or roll forward)."""
    if not in_id_range(number):
        raise NotFoundError(f"task {name!r} has no version {number}", field="version")
    with transaction(session):
        task = _task(session, tenant_id, name, lock=True)
        found = session.scalar(
            select(TaskVersion.id).where(
                TaskVersion.task_id == task.id, TaskVersion.number == number
            )
        )
        if found is None:
            raise NotFoundError(f"task {name!r} has no version {number}", field="version")
        task.active_version = number
        bump_change_epoch(session)
    return task


def delete_task_version(
    session: Session, store: ObjectStore, *, tenant_id: int, name: str, number: int
) -> Task:
    """Delete a version and its blobs (unless shared); if it was active, the newest other one is.

    Version numbers are never reused.
    """
    if not in_id_range(number):
        raise NotFoundError(f"task {name!r} has no version {number}", field="version")
    with transaction(session):
        task = _task(session, tenant_id, name, lock=True)
        version = session.scalar(
            select(TaskVersion).where(TaskVersion.task_id == task.id, TaskVersion.number == number)
        )
        if version is None:
            raise NotFoundError(f"task {name!r} has no version {number}", field="version")
        artifact_ids = [
            version.artifact_id,
            version.residual_artifact_id,
            version.shared_artifact_id,
        ]
        session.execute(
            update(Job).where(Job.result_version_id == version.id).values(result_version_id=None)
        )
        session.delete(version)
        session.flush()
        if task.active_version == number:
            task.active_version = session.scalar(
                select(func.max(TaskVersion.number)).where(TaskVersion.task_id == task.id)
            )
        keys = release_artifacts(session, artifact_ids)
        bump_change_epoch(session)
    delete_blobs_if_unused(session, store, keys)
    return task
