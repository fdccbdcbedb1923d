"""The service end to end: real uvicorn API, a real Celery worker process, real Redis.

SQLite + file store, the tiny random BERT as base, tiny datasets and one-step training. One
API server and one worker serve the whole module (`shared_service_stack`); every test scopes
its assertions to its own tasks and jobs. Killing workers and restarting Redis live in
test_worker_recovery.py.
"""

from __future__ import annotations

import threading

import pytest
import redis
from sqlalchemy import func, select

from registry.db import get_session_factory
from registry.models import Artifact, Job, Task, TaskVersion
from registry.stores import checkpoint_key, open_store
from tests.fixtures.services import ServiceStack, wait_until, write_sentiment_jsonl
from worker.app import TRAIN_QUEUE

pytestmark = pytest.mark.services

# One optimizer step (batch larger than the 43 training rows): for tests about the service.
ONE_STEP_JOB = {"epochs": 1, "fix_epochs": 0, "batch_size": 64, "max_length": 16, "density": 0.01}


@pytest.fixture
def stack(shared_service_stack: ServiceStack) -> ServiceStack:
    return shared_service_stack


def _broker_idle(stack: ServiceStack) -> bool:
    client = redis.Redis.from_url(stack.settings.redis_url)
    try:
        return client.llen(TRAIN_QUEUE) == 0 and client.hlen("unacked") == 0
    finally:
        client.close()


def test_uploaded_dataset_trains_to_a_diff_that_predicts_as_the_worker_measured(stack, tmp_path):
    import torch

    from datasets_io.tabular import ColumnMapping
    from diffs.apply import build_task_model
    from diffs.basemodel import load_base
    from diffs.read import loads_artifact
    from worker.data import load_task_data
    from worker.kit.evaluate import evaluate

    job_id = stack.submit(tmp_path, "sentiment", ONE_STEP_JOB)

    job = stack.wait_job(job_id)

    assert job["state"] == "succeeded", job
    assert job["version"] == 1 and job["attempts"] == 1
    texts = ["the film was superb", "our stay was awful"]
    with stack.client() as client:
        blob = client.download_diff("sentiment")
        served = client.predict("sentiment", texts)
    base = load_base(stack.settings.base_model)
    diff = loads_artifact(blob, expected_fingerprint=base.fingerprint, base_shapes=base.shapes)
    assert diff.nnz == round(0.01 * base.n_params)
    model = build_task_model(base, diff).eval()
    # The worker's validation split is seeded: the downloaded diff scores what the job reported.
    data = load_task_data(tmp_path / "sentiment.jsonl", mapping=ColumnMapping(), seed=0)
    metrics = evaluate(
        model,
        data.validation,
        base=base,
        task_type=data.task_type,
        num_labels=len(data.label_names),
        max_length=16,
    )
    assert metrics["accuracy"] == pytest.approx(job["metrics"]["accuracy"], abs=1e-9)
    # The server's hot-swapped prediction agrees with the merged model.
    batch = base.tokenizer(
        texts, padding=True, truncation=True, max_length=diff.meta.max_length, return_tensors="pt"
    )
    with torch.no_grad():
        local = model(**batch).logits.argmax(-1).tolist()
    assert [p["label"] for p in served["predictions"]] == [diff.meta.label_names[i] for i in local]


def test_same_message_delivered_twice_runs_once_and_publishes_one_version(stack, tmp_path):
    job_id = stack.submit(tmp_path, "twice", ONE_STEP_JOB)
    stack.send_train(job_id)  # the API sent one; this is the duplicate

    assert stack.wait_job(job_id)["state"] == "succeeded"
    wait_until(lambda: _broker_idle(stack), timeout_s=60, what="both deliveries to be consumed")

    job = stack.job(job_id)
    with stack.client() as client:
        running = [
            e
            for e in client.job_events(job_id)
            if e["kind"] == "state" and e["payload"].get("state") == "running"
        ]
    assert job["attempts"] == 1 and len(running) == 1
    assert stack.versions_of_job(job_id) == 1


def test_cancel_while_running_leaves_no_version_and_no_orphan_rows(stack, tmp_path):
    long_job = {**ONE_STEP_JOB, "epochs": 50, "batch_size": 8}
    job_id = stack.submit(tmp_path, "cancelme", long_job)
    wait_until(
        lambda: (stack.job(job_id)["progress"].get("step") or 0) >= 2,
        timeout_s=120,
        what="training to start",
    )

    with stack.client() as client:
        assert client.cancel_job(job_id)["cancel_requested"] is True
    job = stack.wait_job(job_id, timeout_s=60)

    assert job["state"] == "cancelled" and job["version"] is None
    assert job["progress"]["step"] < job["progress"]["total_steps"]
    with get_session_factory(stack.settings)() as session, session.begin():
        assert (
            session.scalar(select(func.count()).select_from(Task).where(Task.name == "cancelme"))
            == 0
        )
        assert (
            session.scalar(
                select(func.count())
                .select_from(TaskVersion)
                .where(TaskVersion.source_job_id == job_id)
            )
            == 0
        )
        referenced = set(session.scalars(select(Artifact.object_key)))
    store = open_store(stack.settings.store_url, stack.settings)
    assert store.get_mutable(checkpoint_key(job_id)) is None
    assert set(store.list("artifacts/")) <= referenced  # no diff blob without a row


def test_twenty_concurrent_uploads_and_jobs_all_complete_exactly_once(stack, tmp_path):
    job_ids: list[int] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def submit(i: int) -> None:
        try:
            job_id = stack.submit(tmp_path, f"many{i:02d}", ONE_STEP_JOB, rows=20, seed=i)
            with lock:
                job_ids.append(job_id)
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == [] and len(set(job_ids)) == 20
    jobs = [stack.wait_job(job_id, timeout_s=300) for job_id in sorted(job_ids)]
    assert [j["state"] for j in jobs] == ["succeeded"] * 20
    assert all(j["attempts"] == 1 for j in jobs)
    with get_session_factory(stack.settings)() as session, session.begin():
        names = session.scalars(select(Job.task_name).where(Job.id.in_(job_ids))).all()
        per_job = session.execute(
            select(TaskVersion.source_job_id, func.count())
            .where(TaskVersion.source_job_id.in_(job_ids))
            .group_by(TaskVersion.source_job_id)
        ).all()
        jobs_per_task = session.execute(
            select(Job.task_name, func.count())
            .where(Job.task_name.like("many%"))
            .group_by(Job.task_name)
        ).all()
    assert sorted(names) == [f"many{i:02d}" for i in range(20)]
    assert sorted(per_job) == [(job_id, 1) for job_id in sorted(job_ids)]
    assert all(count == 1 for _, count in jobs_per_task) and len(jobs_per_task) == 20


def test_job_whose_dataset_blob_vanished_fails_with_a_reason(stack, tmp_path):
    with stack.client() as client:
        dataset = client.upload_dataset(
            write_sentiment_jsonl(tmp_path / "p.jsonl", rows=30, seed=7)
        )
    store = open_store(stack.settings.store_url, stack.settings)
    with get_session_factory(stack.settings)() as session, session.begin():
        key = session.scalar(
            select(Artifact.object_key).where(Artifact.sha256 == dataset["sha256"])
        )
    store.delete(key)

    with stack.client() as client:
        job_id = client.create_job("poison", dataset["id"], **ONE_STEP_JOB)["id"]
    poison = stack.wait_job(job_id)
    healthy = stack.wait_job(stack.submit(tmp_path, "healthy", ONE_STEP_JOB, seed=8))

    assert poison["state"] == "failed" and poison["attempts"] == 1
    assert poison["error"]["code"] == "dataset_missing" and "missing" in poison["error"]["message"]
    assert poison["version"] is None
    assert healthy["state"] == "succeeded"  # the worker went on to the next job


@pytest.mark.postgres
def test_end_to_end_on_postgresql_and_s3(
    postgres_server, moto_s3_server, redis_url, tiny_base_dir, tmp_path, api_server, celery_worker
):
    from diffs.basemodel import load_base
    from diffs.read import loads_artifact
    from tests.fixtures.backends import S3_TEST_ENV, fresh_postgres_database, make_s3_bucket
    from tests.fixtures.services import (
        FAST_JOB_ENV,
        prepare_registry,
        service_env_for,
        settings_from_env,
    )

    env = {
        **service_env_for(tmp_path / "data", redis_url, tiny_base_dir),
        **FAST_JOB_ENV,
        **S3_TEST_ENV,
        "DIFFBANK_DATABASE_URL": fresh_postgres_database(postgres_server, None),
        "DIFFBANK_STORE_URL": f"s3://{make_s3_bucket(moto_s3_server)}/diffbank",
        "DIFFBANK_S3_ENDPOINT_URL": moto_s3_server.endpoint_url,
        "DIFFBANK_S3_REGION": "us-east-1",
    }
    settings = settings_from_env(env)
    key = prepare_registry(settings)  # migrates: the API refuses an unmigrated database
    pg_stack = ServiceStack(env, settings, api_server(env), key, celery_worker)
    pg_stack.start_worker()

    job = pg_stack.wait_job(pg_stack.submit(tmp_path, "pgtask", ONE_STEP_JOB))

    assert job["state"] == "succeeded" and job["version"] == 1, job
    with pg_stack.client() as client:
        blob = client.download_diff("pgtask")
        prediction = client.predict("pgtask", ["this meal is lovely"])["predictions"][0]
    base = load_base(settings.base_model)
    diff = loads_artifact(blob, expected_fingerprint=base.fingerprint, base_shapes=base.shapes)
    assert prediction["label"] in diff.meta.label_names
    store = open_store(settings.store_url, settings)
    assert len(list(store.list("artifacts/"))) == 1 and len(list(store.list("datasets/"))) == 1
    assert list(store.list("checkpoints/")) == []
    assert pg_stack.versions_of_job(job["id"]) == 1


def test_consolidation_started_over_http_runs_on_a_real_worker_and_serves_the_new_versions(
    stack, tmp_path
):
    train = {"epochs": 1, "fix_epochs": 1, "batch_size": 16, "max_length": 16, "density": 0.01}
    jobs = [
        stack.submit(tmp_path, name, train, seed=i) for i, name in enumerate(("merge-a", "merge-b"))
    ]
    for job_id in jobs:
        assert stack.wait_job(job_id, timeout_s=180)["state"] == "succeeded"
    with stack.client() as client:
        before = {name: client.get_task(name)["active_version"] for name in ("merge-a", "merge-b")}
        run = client.create_consolidation(
            tasks=["merge-a", "merge-b"],
            budget=2000,
            tolerance=100.0,
            epochs=0.5,
            fix_epochs=0.5,
            batch_size=16,
            max_length=8,
        )
        assert run["state"] == "queued"
        wait_until(
            lambda: client.get_consolidation(run["id"])["state"] not in ("queued", "running"),
            timeout_s=180,
            what="the consolidation run to finish",
        )
        done = client.get_consolidation(run["id"])
        assert done["state"] == "succeeded", done
        assert done["total_nnz_after"] == 2000
        assert [t["task"] for t in done["tasks"]] == ["merge-a", "merge-b"]
        for row in done["tasks"]:
            assert row["accepted"] is True
            assert row["version_after"] == before[row["task"]] + 1
            assert client.get_task(row["task"])["active_version"] == row["version_after"]
            predicted = client.predict(row["task"], ["a fine film"])
            assert len(predicted["predictions"]) == 1
