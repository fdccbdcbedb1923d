"""Thin Celery tasks: parse arguments, call the plain functions that do the work.

Delivery options (late acks, requeue when a worker is lost, time limits) are the app's
configuration (`worker.app`). Heavy modules (torch, the trainer) are imported inside the task
bodies so that importing the Celery app, for enqueueing or for `celery worker` start-up,
stays light.
"""

from __future__ import annotations

from celery.utils.log import get_task_logger

from settings import get_settings
from worker.app import CONSOLIDATE_TASK, POLICY_TASK, SWEEP_TASK, TRAIN_TASK, celery_app

log = get_task_logger(__name__)


def _parse_id(value: object, name: str) -> int:
    """A positive integer id from a message argument; anything else is a malformed message."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"{name} must be an integer id, got {value!r}")
    parsed = int(value)
    if parsed <= 0:
        raise ValueError(f"{name} must be positive, got {parsed}")
    return parsed


@celery_app.task(name=TRAIN_TASK)
def train(job_id: object) -> str:
    """Run training job `job_id` (a duplicate delivery of a claimed job is a no-op)."""
    from worker.diffprune.job import run_training_job

    outcome = run_training_job(_parse_id(job_id, "job_id"), settings=get_settings())
    log.info("train job %s: %s", job_id, outcome)
    return outcome


@celery_app.task(name=CONSOLIDATE_TASK)
def consolidate(run_id: object) -> str:
    """Run consolidation run `run_id` (a duplicate delivery of a claimed run is a no-op)."""
    from worker.consolidation.job import run_consolidation

    outcome = run_consolidation(_parse_id(run_id, "run_id"), settings=get_settings())
    log.info("consolidation run %s: %s", run_id, outcome)
    return outcome


@celery_app.task(name=SWEEP_TASK)
def sweep() -> int:
    """Re-send jobs whose queue message was lost; returns how many were re-sent."""
    from worker.sweep import sweep_lost_jobs

    resent = sweep_lost_jobs(settings=get_settings())
    if resent:
        log.warning("sweep re-sent %d job(s): %s", len(resent), resent)
    return len(resent)


@celery_app.task(name=POLICY_TASK)
def consolidation_policy() -> int:
    """Start a consolidation for every tenant and base over the stored-nonzeros threshold."""
    from worker.consolidation.policy import apply_consolidation_policy

    started = apply_consolidation_policy(get_settings())
    if started:
        log.info("consolidation policy started run(s) %s", started)
    return len(started)
