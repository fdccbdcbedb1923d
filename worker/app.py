"""The Celery application: broker, routing, delivery guarantees and the beat schedule.

Importing this module must stay light (no torch): the API imports it to enqueue jobs. Queue
and task names, and `enqueue`, live in `worker.queueing` and are re-exported here.
"""

from __future__ import annotations

from celery import Celery
from celery.signals import worker_init

from settings import Settings, get_settings
from worker.beat import beat_schedule
from worker.device import pin_visible_gpu
from worker.queueing import (
    CONSOLIDATE_QUEUE,
    CONSOLIDATE_TASK,
    JOB_QUEUES,
    JOB_TASKS,
    MAINTENANCE_QUEUE,
    MAINTENANCE_TASKS,
    POLICY_TASK,
    SWEEP_TASK,
    TASK_QUEUES,
    TRAIN_QUEUE,
    TRAIN_TASK,
    JobMessage,
    enqueue,
    job_message,
)

__all__ = [
    "CONSOLIDATE_QUEUE",
    "CONSOLIDATE_TASK",
    "DEFAULT_REDIS_URL",
    "JOB_QUEUES",
    "JOB_TASKS",
    "MAINTENANCE_QUEUE",
    "POLICY_TASK",
    "SWEEP_TASK",
    "TRAIN_QUEUE",
    "TRAIN_TASK",
    "JobMessage",
    "broker_url",
    "celery_app",
    "enqueue",
    "job_message",
    "make_celery_app",
]

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


def broker_url(settings: Settings) -> str:
    """The Redis URL the broker uses (the conventional local Redis when none is configured)."""
    return settings.redis_url or DEFAULT_REDIS_URL


def make_celery_app(settings: Settings) -> Celery:
    """A Celery app configured from settings (one job per worker process, late acks)."""
    app = Celery("diffbank", broker=broker_url(settings), include=["worker.celery_tasks"])
    app.conf.update(
        task_routes={task: {"queue": queue} for task, queue in TASK_QUEUES.items()},
        task_default_queue=TRAIN_QUEUE,
        task_create_missing_queues=True,
        worker_concurrency=1,
        worker_prefetch_multiplier=1,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # Periodic maintenance is acked on receipt: a lost tick is simply the next one.
        task_annotations={task: {"acks_late": False} for task in MAINTENANCE_TASKS},
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
