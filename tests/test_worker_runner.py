"""The job runner, in process: claim → train → publish, duplicates, cancel, failures, attempt cap.

Real parts: SQLite registry (migrated), file object store, the diff-pruning trainer on a tiny
random BERT. The Celery/Redis path is covered by test_service_e2e.py.
"""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select, update

from registry import catalog
from registry.db import get_session_factory
from registry.models import Job, JobEvent, Task, TaskVersion, utcnow
from registry.stores import checkpoint_key, open_store
from settings import Settings
from tests.fixtures.services import seed_training_job, write_sentiment_jsonl
from worker.diffprune.job import run_training_job
from worker.lifecycle import CANCELLED, FAILED, NOT_CLAIMED, SUCCEEDED, JobMonitor

# 43 training rows, batch 64: one step per phase (gated, then mask fixed), 2 in all.
TINY_PARAMS = {"epochs": 1, "fix_epochs": 1, "batch_size": 64, "max_length": 16, "density": 0.01}


@pytest.fixture
def settings(tmp_path: Path, tiny_base_dir: Path) -> Settings:
    """Settings for one test: its own SQLite file and file store, the tiny base, fast knobs."""
    return Settings(
        data_dir=tmp_path / "data",
        base_model=str(tiny_base_dir),
        checkpoint_every_steps=2,
        job_progress_interval_s=0.0,
        job_cancel_poll_s=0.0,
        job_heartbeat_interval_s=0.2,
        worker_device="cpu",
    )


@pytest.fixture
def dataset_path(tmp_path: Path) -> Path:
    return write_sentiment_jsonl(tmp_path / "sentiment.jsonl")


def _job(settings: Settings, job_id: int) -> Job:
    with get_session_factory(settings)() as session:
        return catalog.load_job(session, job_id=job_id)


def _count(settings: Settings, model: type, *where) -> int:
    with get_session_factory(settings)() as session, session.begin():
        return session.scalar(select(func.count()).select_from(model).where(*where))


def test_training_job_succeeds_publishes_one_version_and_a_redelivery_is_a_no_op(
    settings, dataset_path
):
    job_id = seed_training_job(settings, dataset_path, params=TINY_PARAMS)

    assert run_training_job(job_id, settings=settings) == SUCCEEDED

    job = _job(settings, job_id)
    assert job.state == "succeeded" and job.attempts == 1
    assert job.result_version_id is not None
    assert "accuracy" in job.metrics and job.metrics["train_seconds"] > 0
    assert job.progress["step"] == job.progress["total_steps"] > 0
    with get_session_factory(settings)() as session, session.begin():
        version = session.get(TaskVersion, job.result_version_id)
        base = session.get(Task, version.task_id).base_model
        assert version.source_job_id == job_id and version.number == 1
        assert version.nnz == round(0.01 * base.n_params)
    # the checkpoint is gone once the job is finished
    store = open_store(settings.store_url, settings)
    assert store.get_mutable(checkpoint_key(job_id)) is None
    kinds = [e.kind for e in _events(settings, job_id)]
    assert kinds[0] == "state" and kinds[-1] == "state" and "progress" in kinds

    # The same message delivered again after success: nothing runs, nothing is published.
    assert run_training_job(job_id, settings=settings) == NOT_CLAIMED

    assert _count(settings, TaskVersion, TaskVersion.source_job_id == job_id) == 1
    assert _job(settings, job_id).attempts == 1


def test_job_whose_dataset_blob_is_gone_fails_with_dataset_missing(settings, dataset_path):
    job_id = seed_training_job(settings, dataset_path, params=TINY_PARAMS)
    store = open_store(settings.store_url, settings)
    for key in list(store.list("datasets/")):
        store.delete(key)

    assert run_training_job(job_id, settings=settings) == FAILED

    job = _job(settings, job_id)
    assert job.state == "failed" and job.error_code == "dataset_missing"
    assert "missing" in job.error_message
    assert _count(settings, TaskVersion) == 0


def test_job_with_impossible_params_fails_naming_the_field(settings, dataset_path):
    job_id = seed_training_job(settings, dataset_path, params={**TINY_PARAMS, "warmup": 2.0})

    assert run_training_job(job_id, settings=settings) == FAILED

    job = _job(settings, job_id)
    assert job.error_code == "invalid_params" and "warmup" in job.error_message


def test_cancel_while_running_ends_cancelled_without_version_or_checkpoint(settings, dataset_path):
    long_params = {**TINY_PARAMS, "epochs": 200, "batch_size": 8}
    job_id = seed_training_job(settings, dataset_path, params=long_params)
    outcome: list[str] = []
    runner = threading.Thread(
        target=lambda: outcome.append(run_training_job(job_id, settings=settings))
    )
    runner.start()
    _wait_for(lambda: _job(settings, job_id).progress.get("step", 0) >= 3, timeout_s=120)

    with get_session_factory(settings)() as session:
        catalog.request_cancel(session, tenant_id=_job(settings, job_id).tenant_id, job_id=job_id)
    runner.join(timeout=60)

    assert outcome == [CANCELLED]
    job = _job(settings, job_id)
    assert job.state == "cancelled" and job.result_version_id is None
    assert job.progress["step"] < job.progress["total_steps"]
    assert _count(settings, TaskVersion) == 0
    store = open_store(settings.store_url, settings)
    assert store.get_mutable(checkpoint_key(job_id)) is None
    assert list(store.list("artifacts/")) == []


def test_running_job_past_its_attempt_cap_ends_failed_too_many_attempts(settings, dataset_path):
    job_id = seed_training_job(settings, dataset_path, params=TINY_PARAMS, max_attempts=2)
    # Two workers claimed it and died: running, attempts at the cap, heartbeat long stale.
    with get_session_factory(settings)() as session, session.begin():
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(
                state="running",
                attempts=2,
                worker_id="dead:1",
                heartbeat_at=utcnow() - timedelta(hours=1),
            )
        )

    assert run_training_job(job_id, settings=settings) == NOT_CLAIMED

    job = _job(settings, job_id)
    assert job.state == "failed" and job.error_code == "too_many_attempts"
    assert _count(settings, TaskVersion) == 0


def test_monitor_stops_training_when_another_worker_owns_the_job(settings, dataset_path):
    job_id = seed_training_job(settings, dataset_path, params=TINY_PARAMS)
    sessions = get_session_factory(settings)
    with sessions() as session:
        catalog.claim_job(session, job_id=job_id, worker_id="other:1")
    monitor = JobMonitor(sessions, job_id, "me:2", settings)

    assert monitor.should_stop() is True
    assert monitor.lost and not monitor.cancel_requested


def test_soft_time_limit_ends_any_job_failed_with_time_limit(settings, dataset_path):
    from celery.exceptions import SoftTimeLimitExceeded

    from worker.lifecycle import failure_of, run_job

    def past_the_limit(claimed):
        raise SoftTimeLimitExceeded()

    job_id = seed_training_job(settings, dataset_path, params=TINY_PARAMS)
    assert run_job(job_id, kind="train", settings=settings, work=past_the_limit) == FAILED
    assert _job(settings, job_id).error_code == "time_limit"
    assert failure_of(ValueError("x"), settings) == ("internal_error", "ValueError: x")


def _events(settings: Settings, job_id: int) -> list[JobEvent]:
    with get_session_factory(settings)() as session, session.begin():
        return list(
            session.scalars(
                select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.seq)
            )
        )


def _wait_for(condition, *, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(0.05)
