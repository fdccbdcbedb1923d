"""Run one training job end to end: claim it, load its data, train, publish, record the outcome.

The SQL registry is the source of truth. A duplicate or late delivery finds the job already
claimed (or finished) and does nothing; a delivery after a worker died resumes from the job's
checkpoint in the store's mutable area; the version is published in the same transaction that
marks the job succeeded, so a job publishes at most one version.
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy.orm import Session

from registry import catalog
from registry.db import get_session_factory
from registry.models import Job
from registry.settings import Settings
from registry.stores import ObjectStore, checkpoint_key, open_store
from worker.lifecycle import (
    CANCELLED,
    LOST,
    NOT_CLAIMED,
    SUCCEEDED,
    JobFailure,
    JobLost,
    JobMonitor,
    StoreCheckpointIO,
    fail_job,
    finish_job,
    load_job_base,
    load_job_data,
    worker_identity,
)

log = logging.getLogger(__name__)


def _config_for(job: Job, settings: Settings) -> Any:
    """The job's `DiffPruneConfig`: its params over the trainer defaults, plus worker knobs."""
    from worker.config import DiffPruneConfig
    from worker.device import select_device

    values = dict(job.params or {})
    values["checkpoint_every"] = settings.checkpoint_every_steps
    values["device"] = select_device(settings)
    try:
        return DiffPruneConfig.from_dict(values)
    except (TypeError, ValueError) as exc:
        raise JobFailure("invalid_params", f"job parameters: {exc}") from exc


def _publish(
    session: Session,
    store: ObjectStore,
    job: Job,
    *,
    worker_id: str,
    base: Any,
    data: Any,
    config: Any,
    result: Any,
) -> int:
    """Write order: diff blob → verify → one transaction (version + job succeeded). Version id."""
    from registry.artifact import dumps_artifact
    from registry.publish import publish_version

    base_row = catalog.register_base_model(
        session,
        name=base.name,
        source=job.base_model,
        fingerprint=base.fingerprint,
        n_params=base.n_params,
    )
    task = catalog.get_or_create_task(
        session,
        tenant_id=job.tenant_id,
        name=job.task_name,
        base_model_id=base_row.id,
        task_type=data.task_type,
        label_names=list(data.label_names),
    )
    metrics = dict(result.metrics)
    metrics["train_seconds"] = round(float(result.train_seconds), 3)
    metrics["peak_memory_bytes"] = int(result.peak_memory_bytes)
    try:
        version = publish_version(
            session,
            store,
            task_id=task.id,
            diff_bytes=dumps_artifact(result.diff),
            nnz=result.diff.nnz,
            density=float(result.diff.meta.density),
            metrics=metrics,
            config=config.to_dict(),
            source_job_id=job.id,
            label_names=list(data.label_names),
            finish_job_id=job.id,
            worker_id=worker_id,
        )
    except catalog.ConflictError as exc:
        if exc.code == "job_not_running":
            raise JobLost(str(exc)) from exc
        raise
    return version.id


def run_training_job(job_id: int, *, settings: Settings) -> str:
    """Claim, train and publish job `job_id`; returns the outcome (see the module constants)."""
    from worker.trainer import TrainingCancelled, train_diff

    sessions = get_session_factory(settings)
    store = open_store(settings.store_url, settings)
    worker_id = worker_identity()
    with sessions() as session:
        job = catalog.claim_job(
            session,
            job_id=job_id,
            worker_id=worker_id,
            stale_after_s=settings.sweep_requeue_after_s,
        )
    if job is None:
        log.info("job %s not claimed (duplicate delivery, finished or out of attempts)", job_id)
        return NOT_CLAIMED
    checkpoint = StoreCheckpointIO(store, checkpoint_key(job_id))
    monitor = JobMonitor(
        sessions, job_id, worker_id, settings, attempt=job.attempts, checkpoint=checkpoint
    )
    log.info(
        "job %s claimed by %s (attempt %d/%d)", job_id, worker_id, job.attempts, job.max_attempts
    )
    try:
        with monitor.heartbeating():
            if job.kind != "train":
                raise JobFailure("wrong_job_kind", f"job {job_id} is a {job.kind} job, not train")
            config = _config_for(job, settings)
            with sessions() as session:
                data = load_job_data(session, store, job, settings, seed=config.seed)
            base = load_job_base(job.base_model)
            result = train_diff(
                data,
                config,
                base=base,
                progress=monitor.progress,
                checkpoint=checkpoint,
                should_stop=monitor.should_stop,
            )
            if monitor.should_stop():
                raise TrainingCancelled()
            with sessions() as session:
                _publish(
                    session,
                    store,
                    job,
                    worker_id=worker_id,
                    base=base,
                    data=data,
                    config=config,
                    result=result,
                )
    except (TrainingCancelled, JobLost):
        if monitor.lost or not finish_job(sessions, job_id, worker_id, CANCELLED):
            log.warning("job %s is no longer ours; leaving it to its new worker", job_id)
            return LOST
        checkpoint.remove()
        return CANCELLED
    except JobFailure as exc:
        return fail_job(sessions, checkpoint, job_id, worker_id, exc.code, exc.message)
    except catalog.CatalogError as exc:
        return fail_job(sessions, checkpoint, job_id, worker_id, exc.code, str(exc))
    except Exception as exc:
        if type(exc).__name__ == "SoftTimeLimitExceeded":
            return fail_job(
                sessions,
                checkpoint,
                job_id,
                worker_id,
                "time_limit",
                f"the job ran past its time limit ({settings.job_soft_time_limit_s}s)",
            )
        log.exception("job %s failed", job_id)
        return fail_job(
            sessions,
            checkpoint,
            job_id,
            worker_id,
            "internal_error",
            f"{type(exc).__name__}: {exc}",
        )
    checkpoint.remove()
    log.info("job %s succeeded", job_id)
    return SUCCEEDED
