"""The periodic sweep: re-send jobs whose queue message was lost.

Lost means: a job queued for longer than `sweep_requeue_after_s` whose message is neither
waiting in a broker queue nor held unacknowledged by a worker (the broker restarted without
its data, or the enqueue after the row commit failed); or a running job whose heartbeat is
older than that (its worker died; its unacked message would only come back after the broker's
visibility timeout, which is longer than the longest job). Re-sending is always safe: a
worker claims a job with a compare-and-set, so a duplicate message is a no-op.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Iterable

import redis
from kombu import Connection

from registry import catalog
from registry.db import get_session_factory
from registry.models import Job
from settings import Settings
from worker.app import broker_url, celery_app
from worker.queueing import JOB_QUEUES, JOB_TASKS, PRIORITY_STEPS, enqueue, job_message

log = logging.getLogger(__name__)

# kombu's Redis transport: a queue with priorities is several lists `<queue><SEP><priority>`;
# delivered-but-unacked messages live in one hash.
_PRIORITY_SEP = "\x06\x16"
_UNACKED_HASH = "unacked"

MessageRef = tuple[str, int]  # (task name, first argument: job id or consolidation run id)


def message_ref(raw: bytes | str) -> MessageRef | None:
    """(task name, first argument) of one kombu message as stored in Redis, or None."""
    try:
        message = json.loads(raw)
        if isinstance(message, list):  # unacked entries are [message, exchange, routing_key]
            message = message[0]
        task = message["headers"]["task"]
        body = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
        return task, int(args[0])
    except (ValueError, KeyError, IndexError, TypeError):
        return None


def broker_messages(
    client: redis.Redis, queues: Iterable[str]
) -> tuple[set[MessageRef], set[MessageRef]]:
    """Messages waiting in `queues`, and messages delivered but not yet acknowledged."""
    waiting: set[MessageRef] = set()
    for queue in queues:
        for priority in PRIORITY_STEPS:
            name = queue if priority == 0 else f"{queue}{_PRIORITY_SEP}{priority}"
            for raw in client.lrange(name, 0, -1):
                ref = message_ref(raw)
                if ref:
                    waiting.add(ref)
    unacked = {ref for raw in client.hvals(_UNACKED_HASH) if (ref := message_ref(raw))}
    return waiting, unacked


def _run_id_of(session, job: Job) -> int | None:
    """The consolidation run of a consolidate job (its message's argument); None otherwise."""
    if job.kind != "consolidate":
        return None
    run = catalog.get_consolidation_run_for_job(session, job_id=job.id)
    return None if run is None else run.id


def sweep_lost_jobs(*, settings: Settings, client: redis.Redis | None = None) -> list[int]:
    """Re-send every lost job (see the module docstring); the ids of the jobs re-sent."""
    sessions = get_session_factory(settings)
    own_client = client is None
    client = client or redis.Redis.from_url(broker_url(settings))
    resent: list[int] = []
    try:
        with sessions() as session, Connection(broker_url(settings)) as connection:
            candidates = catalog.find_lost_jobs(
                session, older_than_s=settings.sweep_requeue_after_s
            )
            if not candidates:
                return resent
            waiting, unacked = broker_messages(client, JOB_QUEUES)
            for job in candidates:
                run_id = _run_id_of(session, job)
                if job.kind not in JOB_TASKS or (job.kind == "consolidate" and run_id is None):
                    continue  # no message runs it
                ref = job_message(job.kind, job_id=job.id, run_id=run_id).ref
                if ref in waiting or (job.state == "queued" and ref in unacked):
                    continue  # a worker will get (or has) it
                enqueue(celery_app, job.kind, job_id=job.id, run_id=run_id, connection=connection)
                catalog.mark_enqueued(session, job_id=job.id)
                resent.append(job.id)
                log.warning("sweep re-sent %s job %s (%s)", job.kind, job.id, job.state)
    finally:
        if own_client:
            client.close()
    return resent
