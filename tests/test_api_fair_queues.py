"""One tenant cannot starve the rest: per-tenant limits (429) and fair broker priorities."""

from __future__ import annotations

import json

import pytest
import redis

from tests.api_support import SENTIMENT_ROWS, make_world

pytestmark = pytest.mark.services


@pytest.fixture
def world(tmp_path, redis_server, tiny_base_dir):
    """A fresh app with low per-tenant limits and an empty broker."""
    redis.Redis.from_url(redis_server.url).flushdb()
    return make_world(
        tmp_path,
        redis_server.url,
        tiny_base_dir,
        tenant_max_active_jobs=3,
        tenant_max_active_work=8 * 100,
    )


def _submit(world, who: str, dataset_id: int, task: str, **params):
    return world.client.post(
        "/v1/jobs",
        headers=world.headers(who),
        json={"task": task, "dataset_id": dataset_id, **params},
    )


def test_a_tenant_over_its_job_limit_gets_429_and_nothing_is_queued(world):
    dataset = world.upload_ok("alice", SENTIMENT_ROWS)["id"]
    for i in range(3):
        assert _submit(world, "alice", dataset, f"t{i}", epochs=1, fix_epochs=1).status_code == 202
    before = world.counts()
    refused = _submit(world, "alice", dataset, "t3", epochs=1, fix_epochs=1)
    assert refused.status_code == 429, refused.text
    assert refused.json()["error"]["code"] == "too_many_jobs"
    assert refused.headers["Retry-After"]
    assert world.counts() == before
    other = world.upload_ok("bob", SENTIMENT_ROWS)["id"]
    assert _submit(world, "bob", other, "b0", epochs=1, fix_epochs=1).status_code == 202


def test_a_job_asking_more_work_than_the_tenant_may_hold_gets_429(world):
    dataset = world.upload_ok("alice", SENTIMENT_ROWS)["id"]  # 8 rows, one micro-batch
    before = world.counts()
    refused = _submit(world, "alice", dataset, "huge", epochs=100, fix_epochs=100, batch_size=1)
    assert refused.status_code == 429, refused.text
    error = refused.json()["error"]
    assert error["code"] == "too_much_work" and error["field"] == "epochs"
    assert world.counts() == before


# Work counts training steps (batches): ceil(8 rows / batch_size) x (epochs + fix_epochs).
WORK_CASES = [
    # (id, batch_size, epochs, fix_epochs, status)
    ("batch_1_over_the_limit", 1, 100, 100, 429),  # 1,600 steps
    ("batch_1_one_epoch_over", 1, 51, 50, 429),  # 808 steps
    ("batch_1_at_the_limit", 1, 50, 50, 202),  # 800 steps
    ("batch_2_at_the_limit", 2, 100, 100, 202),  # 4 x 200 = 800 steps
    ("whole_table_per_batch", 8, 100, 100, 202),  # 200 steps
    ("batch_larger_than_the_table", 32, 100, 100, 202),  # 200 steps
]


@pytest.mark.parametrize(
    "batch_size,epochs,fix_epochs,status",
    [c[1:] for c in WORK_CASES],
    ids=[c[0] for c in WORK_CASES],
)
def test_work_counts_training_steps_so_small_batches_cost_more(
    world, batch_size, epochs, fix_epochs, status
):
    dataset = world.upload_ok("alice", SENTIMENT_ROWS)["id"]  # 8 rows
    before = world.counts()
    response = _submit(
        world, "alice", dataset, "t", epochs=epochs, fix_epochs=fix_epochs, batch_size=batch_size
    )
    assert response.status_code == status, response.text
    if status == 429:
        assert response.json()["error"]["code"] == "too_much_work"
        assert world.counts() == before


def _queued_tenants(world) -> list[str]:
    """Tenants of the waiting train messages in the order a worker takes them."""
    client = redis.Redis.from_url(world.redis_url)
    names = ["train"] + [f"train\x06\x16{p}" for p in (3, 6, 9)]
    tenants = {world.tenant_ids["alice"]: "alice", world.tenant_ids["bob"]: "bob"}
    order = []
    with world.session_factory() as session:
        from registry.models import Job

        for name in names:  # kombu serves priority 0 first; each list pops from its right end
            for raw in reversed(client.lrange(name, 0, -1)):
                job_id = json.loads(raw)["headers"]["argsrepr"].strip("[]()").rstrip(",")
                order.append(tenants[session.get(Job, int(job_id)).tenant_id])
    return order


def test_a_tenant_that_queued_first_does_not_hold_the_worker_back_from_others(world):
    alice = world.upload_ok("alice", SENTIMENT_ROWS)["id"]
    bob = world.upload_ok("bob", SENTIMENT_ROWS)["id"]
    for i in range(3):
        assert _submit(world, "alice", alice, f"a{i}", epochs=1, fix_epochs=0).status_code == 202
    assert _submit(world, "bob", bob, "b0", epochs=1, fix_epochs=0).status_code == 202
    assert _queued_tenants(world) == ["alice", "bob", "alice", "alice"]
