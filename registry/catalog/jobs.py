"""Jobs and their events: create, claim (compare-and-set), progress, finish, cancel, sweep."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.orm import Session

from registry.catalog._ids import MAX_ID, get_row, in_id_range
from registry.catalog._names import is_task_name
from registry.catalog._tx import transaction
from registry.catalog.errors import InvalidInputError, NotFoundError
from registry.catalog.pagination import check_limit, paginate
from registry.models import (
    FINISHED_JOB_STATES,
    JOB_KINDS,
    JOB_STATES,
    Dataset,
    Job,
    JobEvent,
    utcnow,
)

DEFAULT_STALE_AFTER_S = 300.0
_jobs = Job.__table__


def _add_event(session: Session, job_id: int, kind: str, payload: dict[str, Any]) -> JobEvent:
    # Callers have already updated the job row in this transaction, which serialises
    # concurrent writers of the same job (row lock / SQLite write lock): max+1 is safe.
    last = session.scalar(select(func.max(JobEvent.seq)).where(JobEvent.job_id == job_id))
    event = JobEvent(job_id=job_id, seq=(last or 0) + 1, kind=kind, payload=payload)
    session.add(event)
    session.flush()
    return event


def _reload(session: Session, job_id: int) -> Job:
    job = get_row(session, Job, job_id, populate_existing=True)
    assert job is not None
    return job


def _check_dataset(session: Session, tenant_id: int, dataset_id: int | None, field: str) -> None:
    if dataset_id is None:
        return
    # A share lock until the job row commits: a concurrent delete waits, then sees the job.
    dataset = get_row(session, Dataset, dataset_id, with_for_update={"read": True, "of": Dataset})
    if dataset is None or dataset.tenant_id != tenant_id:
        raise NotFoundError(f"dataset {dataset_id} not found", field=field)


def insert_job(
    session: Session,
    *,
    tenant_id: int,
    kind: str,
    base_model: str,
    params: dict[str, Any],
    task_name: str | None = None,
    dataset_id: int | None = None,
    validation_dataset_id: int | None = None,
    max_attempts: int = 3,
) -> Job:
    """`create_job` inside the caller's transaction."""
    if kind not in JOB_KINDS:
        raise InvalidInputError(f"unknown job kind {kind!r}", field="kind")
    if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1:
        raise InvalidInputError("max_attempts must be a positive integer", field="max_attempts")
    _check_dataset(session, tenant_id, dataset_id, "dataset_id")
    _check_dataset(session, tenant_id, validation_dataset_id, "validation_dataset_id")
    job = Job(
        tenant_id=tenant_id,
        kind=kind,
        task_name=task_name,
        dataset_id=dataset_id,
        validation_dataset_id=validation_dataset_id,
        base_model=base_model,
        params=dict(params),
        state="queued",
        attempts=0,
        max_attempts=max_attempts,
        cancel_requested=False,
        progress={},
        metrics={},
    )
    session.add(job)
    session.flush()
    _add_event(session, job.id, "state", {"state": "queued"})
    return job


def create_job(
    session: Session,
    *,
    tenant_id: int,
    kind: str,
    base_model: str,
    params: dict[str, Any],
    task_name: str | None = None,
    dataset_id: int | None = None,
    validation_dataset_id: int | None = None,
    max_attempts: int = 3,
) -> Job:
    """A new queued job with its first 'state' event; datasets must be the tenant's."""
    with transaction(session):
        return insert_job(
            session,
            tenant_id=tenant_id,
            kind=kind,
            base_model=base_model,
            params=params,
            task_name=task_name,
            dataset_id=dataset_id,
            validation_dataset_id=validation_dataset_id,
            max_attempts=max_attempts,
        )


def get_job(session: Session, *, tenant_id: int, job_id: int) -> Job:
    """The tenant's job `job_id`, or NotFoundError."""
    with transaction(session):
        job = get_row(session, Job, job_id, populate_existing=True)
    if job is None or job.tenant_id != tenant_id:
        raise NotFoundError(f"job {job_id} not found", field="job_id")
    return job


def load_job(session: Session, *, job_id: int) -> Job | None:
    """Job `job_id` whatever its tenant (for workers and the sweep), or None."""
    with transaction(session):
        return get_row(session, Job, job_id, populate_existing=True)


def mark_enqueued(session: Session, *, job_id: int) -> None:
    """Record that a queue message for the job was (re)sent just now."""
    if not in_id_range(job_id):
        return
    with transaction(session):
        now = utcnow()
        session.execute(
            update(_jobs).where(_jobs.c.id == job_id).values(enqueued_at=now, updated_at=now)
        )


def claim_job(
    session: Session, *, job_id: int, worker_id: str, stale_after_s: float = DEFAULT_STALE_AFTER_S
) -> Job | None:
    """Compare-and-set a job to running for `worker_id`; None if someone else has it.

    Claimable: a queued job, or a running one whose heartbeat is older than `stale_after_s`
    (its worker died). A job out of attempts ends `failed` with `too_many_attempts`; a
    stale job with a cancel request ends `cancelled`.
    """
    if not in_id_range(job_id):
        return None
    now = utcnow()
    stale_before = now - timedelta(seconds=stale_after_s)
    stale_running = and_(
        _jobs.c.state == "running",
        or_(_jobs.c.heartbeat_at.is_(None), _jobs.c.heartbeat_at < stale_before),
    )
    claimable = and_(_jobs.c.id == job_id, or_(_jobs.c.state == "queued", stale_running))
    with transaction(session):
        claimed = session.scalar(
            update(_jobs)
            .where(
                claimable,
                _jobs.c.attempts < _jobs.c.max_attempts,
                _jobs.c.cancel_requested.is_(False),
            )
            .values(
                state="running",
                attempts=_jobs.c.attempts + 1,
                worker_id=worker_id,
                started_at=now,
                heartbeat_at=now,
                updated_at=now,
                error_code=None,
                error_message=None,
            )
            .returning(_jobs.c.id)
        )
        if claimed is not None:
            job = _reload(session, job_id)
            _add_event(
                session,
                job_id,
                "state",
                {"state": "running", "attempt": job.attempts, "worker_id": worker_id},
            )
            return job
        # Not claimable: end it if it is stuck (out of attempts, or cancelled while orphaned).
        ended = session.scalar(
            update(_jobs)
            .where(claimable)
            .values(
                state=_case_cancel_or_fail(),
                error_code=_case_cancel_or_fail(cancelled=None, failed="too_many_attempts"),
                error_message=_case_cancel_or_fail(
                    cancelled=None, failed="the job ran out of attempts (its workers kept dying)"
                ),
                finished_at=now,
                updated_at=now,
            )
            .returning(_jobs.c.state)
        )
        if ended is not None:
            job = _reload(session, job_id)
            payload: dict[str, Any] = {"state": ended}
            if job.error_code:
                payload["error_code"] = job.error_code
            _add_event(session, job_id, "state", payload)
    return None


def _case_cancel_or_fail(cancelled: Any = "cancelled", failed: Any = "failed") -> Any:
    from sqlalchemy import case, literal

    return case((_jobs.c.cancel_requested.is_(True), literal(cancelled)), else_=literal(failed))


def _beat_if_running(session: Session, job_id: int, worker_id: str, **values: Any) -> bool:
    """Stamp the heartbeat (and `values`) if the job runs for `worker_id`; whether it does."""
    now = utcnow()
    updated = session.scalar(
        update(_jobs)
        .where(_jobs.c.id == job_id, _jobs.c.state == "running", _jobs.c.worker_id == worker_id)
        .values(**values, heartbeat_at=now, updated_at=now)
        .returning(_jobs.c.id)
    )
    return updated is not None


def record_progress(
    session: Session, *, job_id: int, worker_id: str, progress: dict[str, Any]
) -> Job | None:
    """Store progress (step, total_steps, loss, expected_nnz, phase), beat, add an event.

    None when the job is not running for `worker_id` any more (the worker should stop).
    """
    if not in_id_range(job_id):
        return None
    with transaction(session):
        if not _beat_if_running(session, job_id, worker_id, progress=dict(progress)):
            return None
        _add_event(session, job_id, "progress", dict(progress))
        return _reload(session, job_id)


def heartbeat(session: Session, *, job_id: int, worker_id: str) -> Job | None:
    """Mark the job alive; None when it is not running for `worker_id` any more."""
    if not in_id_range(job_id):
        return None
    with transaction(session):
        if not _beat_if_running(session, job_id, worker_id):
            return None
        return _reload(session, job_id)


def record_job_end(
    session: Session,
    *,
    job_id: int,
    state: str,
    worker_id: str | None = None,
    metrics: dict[str, Any] | None = None,
    result_version_id: int | None = None,
    error_code: str | None = None,
    error_message: str | None = None,
) -> Job | None:
    """`finish_job` inside the caller's transaction (e.g. with the version it published)."""
    if state not in FINISHED_JOB_STATES:
        raise InvalidInputError(f"a job cannot finish as {state!r}", field="state")
    if not in_id_range(job_id):
        return None
    now = utcnow()
    conditions = [_jobs.c.id == job_id, _jobs.c.state == "running"]
    if worker_id is not None:
        conditions.append(_jobs.c.worker_id == worker_id)
    values: dict[str, Any] = {
        "state": state,
        "finished_at": now,
        "updated_at": now,
        "heartbeat_at": now,
        "error_code": error_code,
        "error_message": error_message,
    }
    if metrics is not None:
        values["metrics"] = dict(metrics)
    if result_version_id is not None:
        values["result_version_id"] = result_version_id
    updated = session.scalar(
        update(_jobs).where(*conditions).values(**values).returning(_jobs.c.id)
    )
    if updated is None:
        return None
    payload: dict[str, Any] = {"state": state}
    if error_code:
        payload["error_code"] = error_code
        payload["error_message"] = error_message
    if result_version_id is not None:
        payload["result_version_id"] = result_version_id
    _add_event(session, job_id, "state", payload)
    return _reload(session, job_id)


def finish_job(
    session: Session,
    *,
    job_id: int,
    state: str,
    worker_id: str | None = None,
    metrics: dict[str, Any] | None = None,
    result_version_id: int | None = None,
    error_code: str | None = None,
    error_message: str | None = None,
) -> Job | None:
    """Compare-and-set a running job (of `worker_id`, if given) to a final state; else None."""
    with transaction(session):
        return record_job_end(
            session,
            job_id=job_id,
            state=state,
            worker_id=worker_id,
            metrics=metrics,
            result_version_id=result_version_id,
            error_code=error_code,
            error_message=error_message,
        )


def request_cancel(session: Session, *, tenant_id: int, job_id: int) -> Job:
    """Cancel a queued job now, or ask the worker of a running one to stop; finished: no-op."""
    now = utcnow()
    with transaction(session):
        job = get_row(session, Job, job_id)
        if job is None or job.tenant_id != tenant_id:
            raise NotFoundError(f"job {job_id} not found", field="job_id")
        cancelled = session.scalar(
            update(_jobs)
            .where(_jobs.c.id == job_id, _jobs.c.state == "queued")
            .values(state="cancelled", cancel_requested=True, finished_at=now, updated_at=now)
            .returning(_jobs.c.id)
        )
        if cancelled is not None:
            _add_event(session, job_id, "state", {"state": "cancelled"})
        else:
            asked = session.scalar(
                update(_jobs)
                .where(
                    _jobs.c.id == job_id,
                    _jobs.c.state == "running",
                    _jobs.c.cancel_requested.is_(False),
                )
                .values(cancel_requested=True, updated_at=now)
                .returning(_jobs.c.id)
            )
            if asked is not None:
                _add_event(session, job_id, "state", {"state": "running", "cancel_requested": True})
        return _reload(session, job_id)


def list_jobs(
    session: Session,
    *,
    tenant_id: int,
    state: str | None = None,
    task: str | None = None,
    kind: str | None = None,
    cursor: str | None = None,
    limit: int = 50,
) -> tuple[list[Job], str | None]:
    """A page of the tenant's jobs, newest first, filtered by state, task name and kind."""
    if state is not None and state not in JOB_STATES:
        raise InvalidInputError(f"unknown job state {state!r}", field="state")
    if kind is not None and kind not in JOB_KINDS:
        raise InvalidInputError(f"unknown job kind {kind!r}", field="kind")
    with transaction(session):
        query = select(Job).where(Job.tenant_id == tenant_id)
        if state is not None:
            query = query.where(Job.state == state)
        if task is not None:
            if not is_task_name(task):  # no job can have it (and NUL never reaches the DB)
                return [], None
            query = query.where(Job.task_name == task)
        if kind is not None:
            query = query.where(Job.kind == kind)
        return paginate(session, query, Job.id, cursor=cursor, limit=limit)


def list_job_events(
    session: Session, *, tenant_id: int, job_id: int, after_seq: int = 0, limit: int = 500
) -> list[JobEvent]:
    """The job's events with seq > `after_seq`, in order."""
    check_limit(limit)
    after_seq = min(max(int(after_seq), 0), MAX_ID)
    with transaction(session):
        job = get_row(session, Job, job_id)
        if job is None or job.tenant_id != tenant_id:
            raise NotFoundError(f"job {job_id} not found", field="job_id")
        return list(
            session.scalars(
                select(JobEvent)
                .where(JobEvent.job_id == job_id, JobEvent.seq > after_seq)
                .order_by(JobEvent.seq)
                .limit(limit)
            )
        )


def find_lost_jobs(session: Session, *, older_than_s: float) -> list[Job]:
    """Jobs whose queue message may be lost: queued and not (re)sent for `older_than_s`, or
    running with a heartbeat older than that (their worker died)."""
    cutoff = utcnow() - timedelta(seconds=older_than_s)
    with transaction(session):
        queued_stale = and_(
            Job.state == "queued",
            or_(
                Job.enqueued_at < cutoff,
                and_(Job.enqueued_at.is_(None), Job.created_at < cutoff),
            ),
        )
        running_stale = and_(
            Job.state == "running", or_(Job.heartbeat_at.is_(None), Job.heartbeat_at < cutoff)
        )
        return list(
            session.scalars(select(Job).where(or_(queued_stale, running_stale)).order_by(Job.id))
        )


def active_jobs(session: Session, *, tenant_id: int) -> list[tuple[Job, int]]:
    """The tenant's queued and running jobs, oldest first, each with its dataset's row count."""
    with transaction(session):
        query = (
            select(Job, func.coalesce(Dataset.rows, 0))
            .outerjoin(Dataset, Dataset.id == Job.dataset_id)
            .where(Job.tenant_id == tenant_id, Job.state.in_(("queued", "running")))
            .order_by(Job.id)
        )
        return [(job, int(rows)) for job, rows in session.execute(query).tuples()]
