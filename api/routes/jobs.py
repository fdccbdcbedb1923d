"""Jobs: create (validated, then enqueued after the row commits), list, get, cancel, events."""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from sqlalchemy import select

from api.deps import (
    CANCEL_ACTION_OF_KIND,
    CursorQuery,
    PageLimitQuery,
    Principal,
    SessionDep,
    SettingsDep,
    authorize,
    require,
)
from api.errors import ApiError
from api.schemas import (
    ROUTE_ERRORS,
    JobCreate,
    JobEventPublic,
    JobEventsPublic,
    JobKind,
    JobPublic,
    JobsPublic,
    JobState,
    error_responses,
)
from diffs.basemodel import canonical_base_name
from registry import catalog
from registry.models import BaseModel, Job, TaskVersion

log = logging.getLogger(__name__)

router = APIRouter(prefix="/jobs", tags=["jobs"])

ERRORS = ROUTE_ERRORS


def job_public(job: Job, *, version: int | None = None) -> JobPublic:
    """The API view of a job row; `version` is the number of the version it published."""
    return JobPublic.model_validate(job).model_copy(update={"version": version})


def _version_numbers(session, jobs: list[Job]) -> dict[int, int]:
    """Result version number of each job that published one."""
    ids = [j.result_version_id for j in jobs if j.result_version_id is not None]
    if not ids:
        return {}
    with catalog.transaction(session):
        rows = session.execute(
            select(TaskVersion.id, TaskVersion.number).where(TaskVersion.id.in_(ids))
        ).all()
    return dict(rows)


def jobs_public(session, jobs: list[Job]) -> list[JobPublic]:
    """API views of jobs, with their result version numbers."""
    numbers = _version_numbers(session, jobs)
    return [job_public(j, version=numbers.get(j.result_version_id)) for j in jobs]


def _resolve_base(session, settings, requested: str | None) -> str:
    """What the worker loads for the job: a registered base's source, or the server default.

    Anything else is an unknown base (422, field base_model): users cannot point the worker
    at arbitrary paths or hub names.
    """
    if requested is None or requested in (
        settings.base_model,
        canonical_base_name(settings.base_model),
    ):
        return settings.base_model
    with catalog.transaction(session):
        row = session.scalar(select(BaseModel).where(BaseModel.name == requested))
    if row is None:
        raise ApiError(
            422,
            "unknown_base_model",
            f"base model {requested!r} is not registered on this server",
            field="base_model",
        )
    return row.source


def _check_task_compatible(
    session, *, tenant_id: int, name: str, base: str, task_type: str
) -> None:
    """409 when the task already exists on another base or with another task type."""
    try:
        task = catalog.get_task(session, tenant_id=tenant_id, name=name)
    except catalog.NotFoundError:
        return
    if task.base_model.name != canonical_base_name(base):
        raise ApiError(
            409,
            "base_model_mismatch",
            f"task {name!r} is on base model {task.base_model.name!r}",
            field="base_model",
        )
    if task.task_type != task_type:
        raise ApiError(
            409,
            "task_type_mismatch",
            f"task {name!r} is a {task.task_type} task; the dataset is {task_type}",
            field="dataset_id",
        )


@router.post(
    "",
    status_code=202,
    response_model=JobPublic,
    responses={**ERRORS, **error_responses(429)},  # too many jobs or too much work in flight
    summary="Queue a training job",
)
def create_job(
    body: JobCreate,
    request: Request,
    principal: Annotated[Principal, Depends(require("jobs.submit"))],
    session: SessionDep,
    settings: SettingsDep,
) -> JobPublic:
    """Validate everything, commit the job row, then enqueue `diffbank.train(job_id)`."""
    from worker.queueing import fair_priority

    tenant_id = principal.tenant_id
    dataset = catalog.get_dataset(session, tenant_id=tenant_id, dataset_id=body.dataset_id)
    if body.validation_dataset_id is not None:
        validation = catalog.get_dataset(
            session, tenant_id=tenant_id, dataset_id=body.validation_dataset_id
        )
        if validation.task_type != dataset.task_type:
            raise ApiError(
                422,
                "task_type_mismatch",
                f"validation dataset is {validation.task_type}, training dataset is "
                f"{dataset.task_type}",
                field="validation_dataset_id",
            )
        unseen = sorted(set(validation.label_names or []) - set(dataset.label_names or []))
        if unseen:
            raise ApiError(
                422,
                "unknown_label",
                f"validation label {unseen[0]!r} never occurs in the training dataset",
                field="validation_dataset_id",
            )
    # Plain values: a catalog lookup that fails (rolls back) expires loaded rows.
    dataset_id, task_type, rows = dataset.id, dataset.task_type, dataset.rows
    base = _resolve_base(session, settings, body.base_model)
    _check_task_compatible(
        session, tenant_id=tenant_id, name=body.task, base=base, task_type=task_type
    )
    _check_density_keeps_entries(session, base, body.density)
    in_flight = _check_tenant_quota(
        session, settings, tenant_id=tenant_id, work=requested_work(rows, body.params())
    )
    job = catalog.create_job(
        session,
        tenant_id=tenant_id,
        kind="train",
        task_name=body.task,
        dataset_id=dataset_id,
        validation_dataset_id=body.validation_dataset_id,
        base_model=base,
        params=body.params(),
        max_attempts=settings.job_max_attempts,
    )
    # Its priority falls with the tenant's jobs already in flight, so tenants share the workers.
    enqueue_job(request, session, "train", job_id=job.id, priority=fair_priority(in_flight))
    return job_public(job)


def requested_work(rows: int, params: dict) -> int:
    """What a training job asks of a worker: its batches, ceil(rows / batch_size) x epochs.

    Both phases count, one per micro-batch (an optimizer step when grad_accum is 1): each
    costs a forward and backward pass whatever its size, so batch_size 1 costs the most.
    """
    from worker.diffprune.config import config_from_job_params, run_steps

    config = config_from_job_params(params)
    prune_steps, fix_steps = run_steps(max(int(rows), 1), config)
    return (prune_steps + fix_steps) * config.grad_accum


def _check_density_keeps_entries(session, base: str, density: float | None) -> None:
    """422 when `density` keeps no parameter of the base (k = round(density * N) is 0)."""
    from diffs.basemodel import k_for_density, load_base
    from worker.diffprune.config import DiffPruneConfig

    density = DiffPruneConfig().density if density is None else density
    with catalog.transaction(session):
        n_params = session.scalar(select(BaseModel.n_params).where(BaseModel.source == base))
    if n_params is None:  # a base no job has published on yet: read its size once
        n_params = load_base(base).n_params
    if k_for_density(density, n_params) < 1:
        raise ApiError(
            422,
            "density_too_small",
            f"density {density} keeps no parameter of the base's {n_params:,}; "
            f"use at least {1 / n_params:.2g}",
            field="density",
        )


def _check_tenant_quota(session, settings, *, tenant_id: int, work: int) -> int:
    """429 when the tenant's queued and running jobs are at a limit; how many there are."""
    active = catalog.active_jobs(session, tenant_id=tenant_id)
    if len(active) >= settings.tenant_max_active_jobs:
        raise ApiError(
            429,
            "too_many_jobs",
            f"{len(active)} jobs are queued or running (the limit is "
            f"{settings.tenant_max_active_jobs}); wait for some to finish",
            field="dataset_id",
            headers={"Retry-After": "60"},
        )
    held = sum(
        requested_work(rows, job.params or {}) for job, rows in active if job.kind == "train"
    )
    if held + work > settings.tenant_max_active_work:
        raise ApiError(
            429,
            "too_much_work",
            f"this job asks {work:,} training steps (batches) on top of {held:,} in flight (the "
            f"limit is {settings.tenant_max_active_work:,}); use fewer epochs, a larger "
            "batch_size, or wait",
            field="epochs",
            headers={"Retry-After": "60"},
        )
    return len(active)


def enqueue_job(
    request: Request,
    session,
    kind: str,
    *,
    job_id: int,
    run_id: int | None = None,
    priority: int = 0,
) -> None:
    """Send a job's message after its rows committed; a broker failure leaves it to the sweep."""
    from worker.app import enqueue

    what = f"job {job_id}" if run_id is None else f"consolidation run {run_id}"
    try:
        enqueue(request.app.state.celery, kind, job_id=job_id, run_id=run_id, priority=priority)
    except Exception:  # the job stays queued; the periodic sweep re-sends it
        log.exception("could not enqueue %s; the sweep will re-send it", what)
        return
    catalog.mark_enqueued(session, job_id=job_id)


@router.get("", response_model=JobsPublic, responses=ERRORS, summary="List jobs")
def list_jobs(
    principal: Annotated[Principal, Depends(require("jobs.read"))],
    session: SessionDep,
    state: JobState | None = None,
    task: Annotated[str | None, Query(max_length=128)] = None,
    kind: JobKind | None = None,
    cursor: CursorQuery = None,
    limit: PageLimitQuery = 50,
) -> JobsPublic:
    """The caller's jobs, newest first, filtered by state, task and kind; cursor pagination."""
    rows, next_cursor = catalog.list_jobs(
        session,
        tenant_id=principal.tenant_id,
        state=state,
        task=task,
        kind=kind,
        cursor=cursor,
        limit=limit,
    )
    return JobsPublic(items=jobs_public(session, rows), next_cursor=next_cursor)


@router.get("/{job_id}", response_model=JobPublic, responses=ERRORS, summary="Get a job")
def get_job(
    job_id: int, principal: Annotated[Principal, Depends(require("jobs.read"))], session: SessionDep
) -> JobPublic:
    """State, progress, metrics, error and published version of one of the caller's jobs."""
    job = catalog.get_job(session, tenant_id=principal.tenant_id, job_id=job_id)
    return jobs_public(session, [job])[0]


@router.post("/{job_id}/cancel", response_model=JobPublic, responses=ERRORS, summary="Cancel a job")
def cancel_job(
    job_id: int,
    principal: Annotated[Principal, Depends(require("jobs.cancel"))],
    session: SessionDep,
) -> JobPublic:
    """A queued job is cancelled at once; a running one stops within seconds."""
    kind = catalog.get_job(session, tenant_id=principal.tenant_id, job_id=job_id).kind
    authorize(principal, CANCEL_ACTION_OF_KIND[kind])  # a consolidation's job cancels as one
    job = catalog.request_cancel(session, tenant_id=principal.tenant_id, job_id=job_id)
    return jobs_public(session, [job])[0]


@router.get(
    "/{job_id}/events", response_model=JobEventsPublic, responses=ERRORS, summary="A job's events"
)
def job_events(
    job_id: int,
    principal: Annotated[Principal, Depends(require("jobs.read"))],
    session: SessionDep,
    after: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 500,
) -> JobEventsPublic:
    """State changes and progress reports with sequence numbers above `after`, oldest first."""
    events = catalog.list_job_events(
        session, tenant_id=principal.tenant_id, job_id=job_id, after_seq=after, limit=limit
    )
    return JobEventsPublic(items=[JobEventPublic.model_validate(e) for e in events])
