"""The work of one training job: load its data and base, train the diff, publish the version.

Claiming, heartbeat, checkpoint, cancellation and failures are `worker.lifecycle.run_job`'s.
A duplicate or late delivery finds the job already claimed (or finished) and does nothing; a
delivery after a worker died resumes from the job's checkpoint; the version is published in
the same transaction that marks the job succeeded, so a job publishes at most one version.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from registry import catalog
from registry.models import Job
from registry.stores import ObjectStore
from settings import Settings
from worker.diffprune.config import RESOLVED_PARAM
from worker.lifecycle import (
    ClaimedJob,
    JobFailure,
    JobLost,
    load_job_base,
    load_job_data,
    run_job,
)


def _config_for(job: Job, settings: Settings) -> Any:
    """The job's `DiffPruneConfig`: its params over the trainer defaults, plus worker knobs."""
    from worker.device import select_device
    from worker.diffprune.config import config_from_job_params

    try:
        return config_from_job_params(
            job.params,
            checkpoint_every=settings.checkpoint_every_steps,
            device=select_device(settings),
        )
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
    from diffs.write import dumps_artifact
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
    run_config = dict(result.diff.meta.config)  # the config as run: "auto" lengths resolved
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
            config=run_config,
            source_job_id=job.id,
            label_names=list(data.label_names),
            finish_job_id=job.id,
            worker_id=worker_id,
        )
    except catalog.ConflictError as exc:
        if exc.code == "job_not_running":
            raise JobLost(str(exc)) from exc
        raise
    row = session.get(Job, job.id)
    if row is not None:  # what "auto" chose, beside what was asked
        chosen = {k: run_config.get(k) for k in ("prune_steps", "fix_steps", "fix_lr")}
        row.params = {**(row.params or {}), RESOLVED_PARAM: chosen}
        session.commit()
    return version.id


def _train(claimed: ClaimedJob) -> None:
    """Load, train and publish; publishing marks the job succeeded in the same transaction."""
    from worker.diffprune.trainer import train_diff

    job, settings, monitor = claimed.job, claimed.settings, claimed.monitor
    config = _config_for(job, settings)
    with claimed.sessions() as session:
        data = load_job_data(session, claimed.store, job, settings, seed=config.seed)
    base = load_job_base(job.base_model)
    result = train_diff(
        data,
        config,
        base=base,
        progress=monitor.progress,
        checkpoint=claimed.checkpoint,
        should_stop=monitor.should_stop,
    )
    claimed.stop_if_asked()
    with claimed.sessions() as session:
        _publish(
            session,
            claimed.store,
            job,
            worker_id=claimed.worker_id,
            base=base,
            data=data,
            config=config,
            result=result,
        )


def run_training_job(job_id: int, *, settings: Settings) -> str:
    """Claim, train and publish job `job_id`; the outcome (`worker.lifecycle` constants)."""
    return run_job(job_id, kind="train", settings=settings, work=_train)
