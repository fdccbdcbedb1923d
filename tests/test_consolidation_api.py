"""The consolidation HTTP surface: start (admin), read, list, cancel, rollback, factored parts.

Real app over SQLite + file store + a real Redis broker; every refused request is checked to
have started nothing: no run row, no job row, no message in the `consolidate` queue.
"""

from __future__ import annotations

import hashlib

import pytest
import redis
from sqlalchemy import func, select

from registry import catalog
from registry.models import ConsolidationRun, Job
from tests.api_support import make_world, random_artifact, register_base


@pytest.fixture(scope="module")
def world(tmp_path_factory, redis_server, tiny_base_dir):
    """carol (keys `admin`, `reader`) owns t1, t2 and t-nover (no version) on the tiny base and
    t-other on another base; bob owns bobtask."""
    world = make_world(
        tmp_path_factory.mktemp("consolidation-api"), redis_server.url, tiny_base_dir
    )
    world.publish_version("admin", "t1", seed=1)
    world.publish_version("admin", "t1", seed=2)
    world.publish_version("admin", "t2", seed=3)
    world.publish_version("bob", "bobtask", seed=4)
    base_row = register_base(world.session_factory, tiny_base_dir)
    with world.session_factory() as session:
        other = catalog.register_base_model(
            session,
            name="other-base",
            source="/nonexistent/other-base",
            fingerprint="0" * 64,
            n_params=1000,
        )
        tenant = world.tenant_ids["admin"]
        catalog.get_or_create_task(
            session,
            tenant_id=tenant,
            name="t-other",
            base_model_id=other.id,
            task_type="classification",
            label_names=["neg", "pos"],
        )
        catalog.get_or_create_task(
            session,
            tenant_id=tenant,
            name="t-nover",
            base_model_id=base_row.id,
            task_type="classification",
            label_names=["neg", "pos"],
        )
    world.n_params, world.base_name = base_row.n_params, base_row.name
    return world


@pytest.fixture(autouse=True)
def _no_run_left_queued(world):
    """Each test starts with no run in flight (one run at a time per task)."""
    yield
    with world.session_factory() as session:
        for job, _ in catalog.active_jobs(session, tenant_id=world.tenant_ids["admin"]):
            if job.kind == "consolidate":
                catalog.request_cancel(session, tenant_id=job.tenant_id, job_id=job.id)


def _started(world) -> tuple[int, int, int]:
    """(run rows, job rows, messages in the consolidate queue)."""
    with world.session_factory() as session, session.begin():
        runs = session.scalar(select(func.count()).select_from(ConsolidationRun))
        jobs = session.scalar(select(func.count()).select_from(Job))
    client = redis.Redis.from_url(world.redis_url)
    try:
        return runs, jobs, client.llen("consolidate")
    finally:
        client.close()


BAD_REQUESTS = [
    # (who, body, status, code, field)
    ("admin", {"tasks": ["nope"], "budget": 100}, 404, "not_found", "tasks"),
    ("admin", {"tasks": ["t1", "t-other"], "budget": 100}, 422, "different_base_models", "tasks"),
    ("admin", {"tasks": ["t1", "t2"], "budget": 0}, 422, None, "budget"),
    ("admin", {"tasks": ["t1", "t2"], "budget": -5}, 422, None, "budget"),
    ("admin", {"tasks": ["t1", "t2"], "budget": "BIG"}, 422, "budget_too_large", "budget"),
    ("admin", {"tasks": ["t1", "bobtask"], "budget": 100}, 404, "not_found", "tasks"),
    ("admin", {"tasks": ["t1", "t-nover"], "budget": 100}, 422, None, "tasks"),
    ("admin", {"tasks": ["t1", "t1"], "budget": 100}, 422, None, "tasks"),
    ("admin", {"tasks": [], "budget": 100}, 422, None, "tasks"),
    ("admin", {"tasks": ["t1"], "budget": 100, "strategy": "magic"}, 422, None, "strategy"),
    ("admin", {"tasks": ["t1"], "budget": 100, "tolerance": -1}, 422, None, "tolerance"),
    ("admin", {"tasks": ["t1"], "budget": 100, "surprise": 1}, 422, None, "surprise"),
    (
        "admin",
        {"tasks": ["t1"], "budget": 100, "base_model": "other-base"},
        422,
        "base_model_mismatch",
        "base_model",
    ),
    ("alice", {"tasks": ["t1"], "budget": 100}, 403, "missing_scope", "Authorization"),
    ("reader", {"tasks": ["t1"], "budget": 100}, 403, "missing_scope", "Authorization"),
    (None, {"tasks": ["t1"], "budget": 100}, 401, "missing_key", "Authorization"),
]


@pytest.mark.parametrize(("who", "body", "status", "code", "field"), BAD_REQUESTS)
def test_invalid_consolidation_requests_are_refused_and_start_nothing(
    world, who, body, status, code, field
):
    if body.get("budget") == "BIG":
        body = {**body, "budget": world.n_params + 1}
    before = _started(world)
    headers = world.headers(who) if who else {}
    response = world.client.post("/v1/consolidations", json=body, headers=headers)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    if code is not None:
        assert error["code"] == code
    assert error["field"] == field
    assert _started(world) == before


def test_admin_starts_a_run_that_is_queued_readable_listed_and_cancellable(world):
    runs, jobs, queued = _started(world)
    response = world.client.post(
        "/v1/consolidations",
        headers=world.headers("admin"),
        json={"tasks": ["t1", "t2"], "budget": 500, "strategy": "rank", "epochs": 2},
    )
    assert response.status_code == 202, response.text
    run = response.json()
    assert run["state"] == "queued" and run["task_names"] == ["t1", "t2"]
    assert run["strategy"] == "rank" and run["budget"] == 500 and run["tolerance"] == 0.5
    assert _started(world) == (runs + 1, jobs + 1, queued + 1)

    got = world.client.get(f"/v1/consolidations/{run['id']}", headers=world.headers("reader"))
    assert got.status_code == 200 and got.json()["id"] == run["id"]
    listed = world.client.get("/v1/consolidations", headers=world.headers("reader")).json()
    assert run["id"] in [item["id"] for item in listed["items"]]
    # another tenant sees nothing
    assert (
        world.client.get(
            f"/v1/consolidations/{run['id']}", headers=world.headers("bob")
        ).status_code
        == 404
    )
    assert (
        world.client.get("/v1/consolidations", headers=world.headers("bob")).json()["items"] == []
    )
    with world.session_factory() as session:
        job = catalog.load_job(session, job_id=run["job_id"])
    assert job.kind == "consolidate" and job.params == {"epochs": 2.0}

    cancelled = world.client.post(
        f"/v1/consolidations/{run['id']}/cancel", headers=world.headers("admin")
    )
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
    redis.Redis.from_url(world.redis_url).delete("consolidate")


def test_without_task_names_every_task_with_a_version_on_the_base_is_taken(world):
    response = world.client.post(
        "/v1/consolidations", headers=world.headers("admin"), json={"budget": 100}
    )
    assert response.status_code == 202, response.text
    assert response.json()["task_names"] == ["t1", "t2"]
    redis.Redis.from_url(world.redis_url).delete("consolidate")


def test_activate_rolls_a_task_back_to_an_earlier_version(world):
    headers = world.headers("admin")
    assert world.client.get("/v1/tasks/t1", headers=headers).json()["active_version"] == 2
    response = world.client.post("/v1/tasks/t1/versions/1/activate", headers=headers)
    assert response.status_code == 200, response.text
    assert response.json()["active_version"] == 1
    assert world.client.get("/v1/tasks/t1", headers=headers).json()["active_version"] == 1
    missing = world.client.post("/v1/tasks/t1/versions/9/activate", headers=headers)
    assert missing.status_code == 404 and missing.json()["error"]["field"] == "version"
    other = world.client.post("/v1/tasks/t1/versions/1/activate", headers=world.headers("bob"))
    assert other.status_code == 404
    reader = world.client.post("/v1/tasks/t1/versions/2/activate", headers=world.headers("reader"))
    assert reader.status_code == 403
    world.client.post("/v1/tasks/t1/versions/2/activate", headers=headers)


def test_factored_parts_of_a_consolidated_version_are_listed_and_downloadable(world):
    from diffs.compose import compose_artifact_bytes
    from registry.publish import publish_consolidated_version, publish_shared_diff

    headers = world.headers("admin")
    assert world.client.get("/v1/tasks/t2/versions/1/parts", headers=headers).status_code == 409
    shared = random_artifact(
        world.base_dir, seed=10, task_type="classification", labels=("neg", "pos"), density=0.01
    )
    residual = random_artifact(
        world.base_dir, seed=11, task_type="classification", labels=("neg", "pos"), density=0.01
    )
    composed = compose_artifact_bytes(shared, residual)
    tenant = world.tenant_ids["admin"]
    with world.session_factory() as session:
        run = catalog.create_consolidation_run(
            session,
            tenant_id=tenant,
            base_model=world.base_name,
            budget=100,
            task_names=["t2"],
        )
        shared_id = publish_shared_diff(session, world.store, run_id=run.id, data=shared)
        task = catalog.get_task(session, tenant_id=tenant, name="t2")
        version = publish_consolidated_version(
            session,
            world.store,
            task_id=task.id,
            residual_bytes=residual,
            nnz=1,
            density=0.0,
            metrics={},
            config={},
            consolidation_run_id=run.id,
            shared_artifact_id=shared_id,
        )
    listing = world.client.get(f"/v1/tasks/t2/versions/{version.number}/parts", headers=headers)
    assert listing.status_code == 200, listing.text
    body = listing.json()
    assert body["layout"] == "factored" and [p["role"] for p in body["parts"]] == [
        "shared",
        "residual",
    ]
    assert body["composed_sha256"] == hashlib.sha256(composed).hexdigest()
    for part, data in zip(body["parts"], (shared, residual), strict=True):
        download = world.client.get(part["url"], headers=headers)
        assert download.status_code == 200 and download.content == data
        assert download.headers["X-Diffbank-Sha256"] == part["sha256"]
    assert (
        world.client.get(body["parts"][0]["url"], headers=world.headers("bob")).status_code == 404
    )
    # the task's diff download: composed by default, the listing with ?layout=factored
    default = world.client.get("/v1/tasks/t2/diff", headers=headers)
    assert default.status_code == 200 and default.content == composed
    factored = world.client.get("/v1/tasks/t2/diff?layout=factored", headers=headers)
    assert factored.status_code == 200 and factored.json() == body
    plain = world.client.get("/v1/tasks/t2/diff?layout=factored&version=1", headers=headers)
    assert plain.status_code == 409 and plain.json()["error"]["field"] == "layout"
    redis.Redis.from_url(world.redis_url).delete("consolidate")


def _cli(world, monkeypatch, capsys, argv: list[str]) -> tuple[int, str, str]:
    """Run the `diffbank` CLI against the in-process app (a real DiffbankClient over TestClient)."""
    from fastapi.testclient import TestClient

    import cli.consolidate as command
    from cli import main
    from cli.http_client import DiffbankClient

    def client_from_args(args):
        return DiffbankClient("http://testserver", args.key, http=TestClient(world.app))

    monkeypatch.setattr(command, "client_from_args", client_from_args)
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_consolidate_queues_a_run_and_prints_json(world, monkeypatch, capsys):
    import json

    code, out, _ = _cli(
        world,
        monkeypatch,
        capsys,
        [
            "consolidate",
            "--tasks",
            "t1,t2",
            "--budget",
            "300",
            "--strategy",
            "rank",
            "--epochs",
            "1",
            "--json",
            "--key",
            world.keys["admin"],
        ],
    )
    assert code == 0
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["state"] == "queued" and summary["budget"] == 300
    assert summary["strategy"] == "rank" and summary["tasks"] == []
    assert {"id", "total_nnz_before", "total_nnz_after"} <= set(summary)
    redis.Redis.from_url(world.redis_url).delete("consolidate")


def test_cli_consolidate_reports_the_server_error(world, monkeypatch, capsys):
    before = _started(world)
    code, _, err = _cli(
        world,
        monkeypatch,
        capsys,
        [
            "consolidate",
            "--tasks",
            "t1,nope",
            "--budget",
            "300",
            "--key",
            world.keys["admin"],
        ],
    )
    assert code == 1 and "nope" in err
    assert _started(world) == before


def test_a_run_over_a_task_whose_training_dataset_was_deleted_is_refused_naming_both(
    world, tiny_base_dir
):
    from registry.publish import publish_version
    from tests.api_support import SENTIMENT_ROWS, random_artifact

    dataset = world.upload_ok("admin", SENTIMENT_ROWS)["id"]
    base_row = register_base(world.session_factory, tiny_base_dir)
    with world.session_factory() as session:
        job = catalog.create_job(
            session,
            tenant_id=world.tenant_ids["admin"],
            kind="train",
            task_name="t-orphan",
            dataset_id=dataset,
            base_model=str(tiny_base_dir),
            params={},
        )
        task = catalog.get_or_create_task(
            session,
            tenant_id=world.tenant_ids["admin"],
            name="t-orphan",
            base_model_id=base_row.id,
            task_type="classification",
            label_names=["neg", "pos"],
        )
        data = random_artifact(
            tiny_base_dir, seed=9, task_type="classification", labels=("neg", "pos"), density=0.02
        )
        publish_version(
            session,
            world.store,
            task_id=task.id,
            diff_bytes=data,
            nnz=1,
            density=0.02,
            metrics={"accuracy": 0.5},
            config={},
            source_job_id=job.id,
        )
        catalog.claim_job(session, job_id=job.id, worker_id="w1")
        assert catalog.finish_job(session, job_id=job.id, state="succeeded", worker_id="w1")
    deleted = world.client.delete(f"/v1/datasets/{dataset}", headers=world.headers("admin"))
    assert deleted.status_code == 204, deleted.text

    before = _started(world)
    response = world.client.post(
        "/v1/consolidations",
        headers=world.headers("admin"),
        json={"tasks": ["t1", "t-orphan"], "budget": 100},
    )
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["field"] == "tasks"
    assert "'t-orphan'" in error["message"] and "training dataset" in error["message"]
    assert _started(world) == before


def test_a_second_run_over_a_task_still_being_consolidated_is_a_conflict(world):
    first = world.client.post(
        "/v1/consolidations", headers=world.headers("admin"), json={"tasks": ["t1"], "budget": 100}
    )
    assert first.status_code == 202, first.text
    before = _started(world)
    again = world.client.post(
        "/v1/consolidations",
        headers=world.headers("admin"),
        json={"tasks": ["t1", "t2"], "budget": 100},
    )
    assert again.status_code == 409, again.text
    assert again.json()["error"]["code"] == "consolidation_in_flight"
    assert _started(world) == before
    other = world.client.post(
        "/v1/consolidations", headers=world.headers("admin"), json={"tasks": ["t2"], "budget": 100}
    )
    assert other.status_code == 202, other.text  # a disjoint group may run alongside
    redis.Redis.from_url(world.redis_url).delete("consolidate")


def test_a_base_only_another_tenant_uses_answers_as_one_nobody_uses(world):
    with world.session_factory() as session:
        base = catalog.register_base_model(
            session, name="bobs-base", source="/x/bobs-base", fingerprint="1" * 64, n_params=1000
        )
        catalog.get_or_create_task(
            session,
            tenant_id=world.tenant_ids["bob"],
            name="bobs-task",
            base_model_id=base.id,
            task_type="classification",
            label_names=["neg", "pos"],
        )
    answers = []
    for name in ("bobs-base", "nobodys-base"):
        response = world.client.post(
            "/v1/consolidations",
            headers=world.headers("admin"),
            json={"budget": 10, "base_model": name},
        )
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        answers.append((error["code"], error["message"].replace(name, "NAME")))
    assert answers[0] == answers[1] == ("unknown_base_model", "base model 'NAME' has no tasks here")


def test_a_merge_run_takes_its_hyperparameters_and_refuses_impossible_ones(world):
    response = world.client.post(
        "/v1/consolidations",
        headers=world.headers("admin"),
        json={"tasks": ["t1", "t2"], "budget": 500, "strategy": "ties", "ties_density": 0.5},
    )
    assert response.status_code == 202, response.text
    run = response.json()
    assert run["strategy"] == "ties"
    with world.session_factory() as session:
        job = catalog.load_job(session, job_id=run["job_id"])
    assert job.params == {"ties_density": 0.5}
    world.client.post(f"/v1/consolidations/{run['id']}/cancel", headers=world.headers("admin"))
    runs, jobs, queued = _started(world)
    refused = world.client.post(
        "/v1/consolidations",
        headers=world.headers("admin"),
        json={"tasks": ["t1", "t2"], "budget": 500, "strategy": "dare", "dare_drop": 1.0},
    )
    assert refused.status_code == 422 and refused.json()["error"]["field"] == "dare_drop"
    assert _started(world) == (runs, jobs, queued)
