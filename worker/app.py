"""The Celery application: broker, queues, routing, delivery guarantees and the beat schedule.

Importing this module must stay light (no torch): the API imports it to enqueue by task name.
"""

from __future__ import annotations

from celery import Celery
from celery.signals import worker_init

from registry.settings import Settings, get_settings
from worker.device import pin_visible_gpu
from worker.schedule import POLICY_TASK, consolidation_beat_schedule

TRAIN_QUEUE = "train"
CONSOLIDATE_QUEUE = "consolidate"
# Light periodic work (the sweep). Kept apart so it never waits behind a long training job.
MAINTENANCE_QUEUE = "maintenance"
ALL_QUEUES = (TRAIN_QUEUE, CONSOLIDATE_QUEUE, MAINTENANCE_QUEUE)

TRAIN_TASK = "diffbank.train"
CONSOLIDATE_TASK = "diffbank.consolidate"
SWEEP_TASK = "diffbank.sweep"

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


def broker_url(settings: Settings) -> str:
    """The Redis URL the broker uses (the conventional local Redis when none is configured)."""
    return settings.redis_url or DEFAULT_REDIS_URL


def beat_schedule(settings: Settings) -> dict:
    """Periodic tasks: the lost-job sweep, plus the consolidation policy when configured."""
    schedule: dict = {
        "sweep-lost-jobs": {
            "task": SWEEP_TASK,
            "schedule": float(settings.sweep_interval_s),
            "options": {"queue": MAINTENANCE_QUEUE, "expires": float(settings.sweep_interval_s)},
        }
    }
    schedule.update(consolidation_beat_schedule(settings))
    return schedule


def make_celery_app(settings: Settings) -> Celery:
    """A Celery app configured from settings (one job per worker process, late acks)."""
    app = Celery("diffbank", broker=broker_url(settings), include=["worker.tasks"])
    app.conf.update(
        task_routes={
            TRAIN_TASK: {"queue": TRAIN_QUEUE},
            CONSOLIDATE_TASK: {"queue": CONSOLIDATE_QUEUE},
            SWEEP_TASK: {"queue": MAINTENANCE_QUEUE},
            POLICY_TASK: {"queue": MAINTENANCE_QUEUE},
        },
        task_default_queue=TRAIN_QUEUE,
        task_create_missing_queues=True,
        worker_concurrency=1,
        worker_prefetch_multiplier=1,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        broker_transport_options={"visibility_timeout": settings.broker_visibility_timeout_s},
        broker_connection_retry_on_startup=True,
        task_soft_time_limit=settings.job_soft_time_limit_s,
        task_time_limit=settings.job_hard_time_limit_s,
        task_ignore_result=True,  # the SQL registry is the source of truth
        result_backend=None,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        beat_schedule=beat_schedule(settings),
        timezone="UTC",
    )
    return app


celery_app = make_celery_app(get_settings())


@worker_init.connect
def _pin_gpu_before_pool_starts(**_: object) -> None:
    """Pin the worker (and the pool children it forks) to its configured GPU."""
    pin_visible_gpu(get_settings())
