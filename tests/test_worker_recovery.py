"""Recovery with real processes: a worker killed with SIGKILL, a Redis crash, lost messages.

Each test has its own API server, workers and registry (SQLite + file store) on the session's
real Redis; the fast job knobs (tests/fixtures/services.py FAST_JOB_ENV) make a dead worker's
heartbeat stale after 4 s and run the sweep every second (in the beat of a worker started
with `beat=True`).
"""

from __future__ import annotations

import signal

import pytest
import redis

from registry.stores import checkpoint_key, open_store
from tests.fixtures.services import wait_until
from worker.app import TRAIN_QUEUE
from worker.sweep import broker_messages, message_ref

pytestmark = pytest.mark.services

# 48 optimizer steps (43 rows, batch 8: 6 per epoch), checkpointed every 2: the worker is
# killed after step 3, with enough steps left that it cannot finish first on a fast machine.
LONG_JOB = {"epochs": 2, "fix_epochs": 6, "batch_size": 8, "max_length": 16, "density": 0.01}
ONE_STEP_JOB = {"epochs": 1, "fix_epochs": 0, "batch_size": 64, "max_length": 16, "density": 0.01}


def test_worker_killed_mid_training_is_resumed_from_its_checkpoint_by_another_worker(
    service_stack, tmp_path
):
    stack = service_stack
    first = stack.start_worker()
    job_id = stack.submit(tmp_path, "resumable", LONG_JOB)
    store = open_store(stack.settings.store_url, stack.settings)
    wait_until(
        lambda: (
            (stack.job(job_id)["progress"].get("step") or 0) >= 3
            and store.get_mutable(checkpoint_key(job_id)) is not None
        ),
        timeout_s=120,
        what="a checkpoint mid-training",
    )

    first.kill(signal.SIGKILL)
    assert not first.alive() and stack.job(job_id)["state"] == "running"
    stack.start_worker(beat=True)  # its beat runs the sweep, which re-sends the orphaned job
    job = stack.wait_job(job_id, timeout_s=180)

    assert job["state"] == "succeeded", job
    assert job["attempts"] == 2
    assert stack.versions_of_job(job_id) == 1
    with stack.client() as client:
        events = client.job_events(job_id)
    second_start = next(
        i
        for i, e in enumerate(events)
        if e["kind"] == "state"
        and e["payload"].get("state") == "running"
        and e["payload"].get("attempt") == 2
    )
    resumed = [e["payload"] for e in events[second_start:] if e["kind"] == "progress"]
    assert resumed[0]["resumed"] is True
    assert resumed[0]["step"] >= 2  # continued from a checkpoint (every 2 steps), not from 0
    assert store.get_mutable(checkpoint_key(job_id)) is None


def test_jobs_survive_a_redis_crash_and_a_lost_message(service_stack, redis_server, tmp_path):
    stack = service_stack
    broker = redis.Redis.from_url(stack.settings.redis_url)
    persisted = stack.submit(tmp_path, "persisted", ONE_STEP_JOB)
    redis_server.restart(sig=signal.SIGKILL)  # a crash: only the append-only file survives
    waiting, _ = broker_messages(broker, [TRAIN_QUEUE])
    assert waiting == {("diffbank.train", persisted)}

    lost = stack.submit(tmp_path, "lost", ONE_STEP_JOB, seed=1)
    for raw in broker.lrange(TRAIN_QUEUE, 0, -1):  # its message is gone (lost recent writes)
        if message_ref(raw) == ("diffbank.train", lost):
            broker.lrem(TRAIN_QUEUE, 1, raw)
    assert broker.llen(TRAIN_QUEUE) == 1
    stack.start_worker(beat=True)  # the sweep re-sends `lost` once it is older than 4 s

    assert stack.wait_job(persisted)["state"] == "succeeded"
    assert stack.wait_job(lost)["state"] == "succeeded"
    assert stack.versions_of_job(persisted) == 1 and stack.versions_of_job(lost) == 1
