"""The lost-job sweep against a real Redis broker and a real SQLite registry."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import pytest
import redis
from kombu import Connection
from sqlalchemy import update

from registry import catalog
from registry.db import get_session_factory
from registry.models import Job, utcnow
from settings import Settings
from tests.fixtures.services import seed_training_job, write_sentiment_jsonl
from worker.app import TRAIN_QUEUE, TRAIN_TASK, celery_app
from worker.sweep import broker_messages, sweep_lost_jobs

pytestmark = pytest.mark.services


@pytest.fixture
def settings(tmp_path: Path, redis_url: str, tiny_base_dir: Path) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        base_model=str(tiny_base_dir),
        redis_url=redis_url,
        sweep_requeue_after_s=60,
    )


@pytest.fixture
def broker(redis_url: str) -> redis.Redis:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def _new_job(settings: Settings, tmp_path: Path, *, age_s: float, **values) -> int:
    dataset = write_sentiment_jsonl(tmp_path / f"d{age_s}-{len(values)}.jsonl")
    job_id = seed_training_job(settings, dataset, task=f"t{age_s:.0f}x{len(values)}")
    then = utcnow() - timedelta(seconds=age_s)
    with get_session_factory(settings)() as session, session.begin():
        session.execute(
            update(Job).where(Job.id == job_id).values(created_at=then, enqueued_at=then, **values)
        )
    return job_id


def _send(settings: Settings, job_id: int) -> None:
    with Connection(settings.redis_url) as connection:
        celery_app.send_task(TRAIN_TASK, args=[job_id], queue=TRAIN_QUEUE, connection=connection)


@contextmanager
def _delivered_without_ack(settings: Settings) -> Iterator[None]:
    """Hold the next `train` message the way a busy worker does (in kombu's unacked hash)."""
    with Connection(settings.redis_url) as connection:
        channel = connection.channel()
        assert channel.basic_get(TRAIN_QUEUE, no_ack=False) is not None
        yield  # closing the channel gives unacked messages back, as a warm shutdown does


def test_old_queued_job_without_a_message_is_resent_once(settings, tmp_path, broker):
    job_id = _new_job(settings, tmp_path, age_s=600)

    assert sweep_lost_jobs(settings=settings) == [job_id]

    waiting, _ = broker_messages(broker, [TRAIN_QUEUE])
    assert waiting == {(TRAIN_TASK, job_id)}
    # the message now waits in the queue: a second sweep leaves it alone
    assert sweep_lost_jobs(settings=settings) == []
    assert broker.llen(TRAIN_QUEUE) == 1


def test_queued_job_whose_message_waits_or_is_delivered_is_left_alone(settings, tmp_path, broker):
    waiting_job = _new_job(settings, tmp_path, age_s=600)
    delivered_job = _new_job(settings, tmp_path, age_s=601)
    _send(settings, delivered_job)
    with _delivered_without_ack(settings):
        _send(settings, waiting_job)

        assert sweep_lost_jobs(settings=settings) == []

        waiting, unacked = broker_messages(broker, [TRAIN_QUEUE])
    assert waiting == {(TRAIN_TASK, waiting_job)}
    assert unacked == {(TRAIN_TASK, delivered_job)}


def test_recently_queued_job_is_not_resent(settings, tmp_path, broker):
    _new_job(settings, tmp_path, age_s=5)

    assert sweep_lost_jobs(settings=settings) == []
    assert broker.llen(TRAIN_QUEUE) == 0


def test_running_job_with_stale_heartbeat_is_resent_even_if_its_dead_worker_holds_it(
    settings, tmp_path, broker
):
    stale = utcnow() - timedelta(seconds=600)
    job_id = _new_job(
        settings,
        tmp_path,
        age_s=900,
        state="running",
        attempts=1,
        worker_id="dead:1",
        heartbeat_at=stale,
    )
    _send(settings, job_id)
    # the dead worker's delivery stays unacked until the broker's visibility timeout
    with _delivered_without_ack(settings):
        assert sweep_lost_jobs(settings=settings) == [job_id]

        waiting, unacked = broker_messages(broker, [TRAIN_QUEUE])
    assert (TRAIN_TASK, job_id) in waiting and (TRAIN_TASK, job_id) in unacked


def test_running_job_with_fresh_heartbeat_and_finished_jobs_are_not_resent(
    settings, tmp_path, broker
):
    _new_job(
        settings,
        tmp_path,
        age_s=900,
        state="running",
        attempts=1,
        worker_id="alive:1",
        heartbeat_at=utcnow(),
    )
    _new_job(settings, tmp_path, age_s=901, state="succeeded", attempts=1)
    _new_job(settings, tmp_path, age_s=902, state="cancelled")

    assert sweep_lost_jobs(settings=settings) == []
    assert broker.llen(TRAIN_QUEUE) == 0


def test_resent_job_has_a_fresh_enqueue_time(settings, tmp_path):
    job_id = _new_job(settings, tmp_path, age_s=600)
    before = utcnow()

    sweep_lost_jobs(settings=settings)

    with get_session_factory(settings)() as session:
        job = catalog.load_job(session, job_id=job_id)
    assert job.enqueued_at >= before - timedelta(seconds=1)
