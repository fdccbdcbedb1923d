"""The app as a whole: light imports, schema check at start, health, readiness, metrics, OpenAPI."""

from __future__ import annotations

import subprocess
import sys

import pytest
from fastapi.testclient import TestClient

from cli.embedded import free_port
from settings import Settings
from tests.api_support import SENTIMENT_ROWS, make_world
from tests.api_support import world as world  # noqa: F401  (module-scoped fixture)

pytestmark = pytest.mark.services


def test_importing_and_creating_the_app_does_not_import_torch(tmp_path):
    code = (
        "import sys\n"
        "import api.app\n"
        "assert 'torch' not in sys.modules, 'import api.app pulled in torch'\n"
        "from registry.db import upgrade\n"
        "from settings import Settings\n"
        f"s = Settings(data_dir={str(tmp_path)!r})\n"
        "upgrade(s.database_url)\n"
        "api.app.create_app(s)\n"
        "assert 'torch' not in sys.modules, 'create_app pulled in torch'\n"
        "assert 'worker.diffprune.trainer' not in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_app_refuses_to_start_on_a_database_without_the_current_schema(tmp_path):
    from api.app import create_app
    from registry.db import SchemaNotCurrentError

    settings = Settings(data_dir=tmp_path)
    with pytest.raises(SchemaNotCurrentError, match="diffbank db upgrade"):
        create_app(settings)


def test_healthz_answers_without_a_key(world):
    response = world.client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_readyz_reports_every_dependency_ready(world):
    response = world.client.get("/readyz")
    assert response.status_code == 200, response.text
    assert response.json() == {
        "status": "ready",
        "checks": {"database": "ok", "store": "ok", "broker": "ok"},
    }


def test_readyz_answers_503_naming_the_broker_when_redis_is_down(
    tmp_path, redis_server, tiny_base_dir
):
    dead = f"redis://127.0.0.1:{free_port()}/0"
    world = make_world(tmp_path, redis_server.url, tiny_base_dir)
    world.app.state.settings = world.settings.model_copy(update={"redis_url": dead})
    response = TestClient(world.app).get("/readyz")
    assert response.status_code == 503
    body = response.json()
    assert body["error"]["code"] == "not_ready"
    assert body["error"]["field"] == "broker"
    assert body["checks"]["database"] == "ok" and body["checks"]["store"] == "ok"
    assert body["checks"]["broker"] != "ok"


def test_metrics_count_requests_by_route_template_and_jobs_by_state(world):
    dataset = world.upload_ok("alice", SENTIMENT_ROWS)
    for _ in range(2):
        response = world.client.post(
            "/v1/jobs",
            headers=world.headers("alice"),
            json={"task": "metrics-task", "dataset_id": dataset["id"]},
        )
        assert response.status_code == 202
    world.client.get("/v1/jobs/999999", headers=world.headers("alice"))
    text = world.client.get("/metrics", headers=world.headers("admin")).text
    assert 'diffbank_http_requests_total{method="POST",route="/v1/jobs",status="202"} 2.0' in text
    assert 'route="/v1/jobs/{job_id}",status="404"' in text
    assert "diffbank_http_request_duration_seconds_bucket" in text
    queued = [
        line for line in text.splitlines() if line.startswith('diffbank_jobs{state="queued"}')
    ]
    assert queued and float(queued[0].split()[-1]) >= 2


def test_openapi_documents_every_route_with_bearer_auth(world):
    schema = world.client.get("/openapi.json").json()
    paths = set(schema["paths"])
    for path in [
        "/v1/datasets",
        "/v1/datasets/{dataset_id}",
        "/v1/jobs",
        "/v1/jobs/{job_id}",
        "/v1/jobs/{job_id}/cancel",
        "/v1/jobs/{job_id}/events",
        "/v1/tasks",
        "/v1/tasks/{name}",
        "/v1/tasks/{name}/versions",
        "/v1/tasks/{name}/diff",
        "/v1/tasks/{name}/stats",
        "/v1/tasks/{name}/versions/{number}",
        "/v1/tasks/{name}/predict",
        "/healthz",
        "/readyz",
    ]:
        assert path in paths, path
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    upload = schema["paths"]["/v1/datasets"]["post"]["requestBody"]["content"]
    assert "file" in upload["multipart/form-data"]["schema"]["properties"]


# Statuses each operation must declare (at least): what the route and the guard answer.
DECLARED_STATUSES = [
    ("post", "/v1/jobs", {202, 400, 401, 403, 404, 409, 413, 422, 429}),
    ("post", "/v1/datasets", {201, 400, 401, 403, 413, 415, 422}),
    ("get", "/v1/tasks/{name}/diff", {200, 206, 304, 307, 400, 401, 403, 404, 409, 413, 416}),
    ("post", "/v1/tasks/{name}/predict", {200, 400, 401, 403, 404, 409, 413, 422, 503}),
    ("post", "/v1/consolidations", {202, 400, 401, 403, 404, 409, 413, 422}),
    ("get", "/metrics", {200, 400, 401, 403, 413}),
    ("get", "/readyz", {200, 503}),
]


@pytest.mark.parametrize(
    "method,path,statuses",
    [c for c in DECLARED_STATUSES],
    ids=[f"{m} {p}" for m, p, _ in DECLARED_STATUSES],
)
def test_openapi_declares_the_statuses_a_route_answers(world, method, path, statuses):
    operation = world.client.get("/openapi.json").json()["paths"][path][method]
    declared = {int(status) for status in operation["responses"]}
    assert statuses <= declared, sorted(statuses - declared)


def test_every_guarded_operation_declares_the_guard_statuses(world):
    paths = world.client.get("/openapi.json").json()["paths"]
    for path, operations in paths.items():
        if not path.startswith("/v1/"):
            continue
        for method, operation in operations.items():
            declared = {int(status) for status in operation["responses"]}
            assert {400, 401, 403, 413, 422} <= declared, (method, path)
            error = operation["responses"]["400"]["content"]["application/json"]["schema"]
            assert error == {"$ref": "#/components/schemas/ErrorPublic"}


def test_metrics_need_an_admin_key_and_name_no_task(world):
    world.publish_version("alice", "secret-project-name", seed=5)
    predicted = world.client.post(
        "/v1/tasks/secret-project-name/predict",
        headers=world.headers("alice"),
        json={"inputs": ["a fine film"]},
    )
    assert predicted.status_code == 200
    assert world.client.get("/metrics").status_code == 401
    refused = world.client.get("/metrics", headers=world.headers("alice"))
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "missing_scope"
    text = world.client.get("/metrics", headers=world.headers("admin")).text
    assert 'diffbank_predictions_total{task_type="classification"}' in text
    assert "secret-project-name" not in text


def test_metrics_allowlisted_hosts_scrape_without_a_key(tmp_path, redis_server, tiny_base_dir):
    world = make_world(tmp_path, redis_server.url, tiny_base_dir, metrics_allowlist="testclient")
    response = world.client.get("/metrics")
    assert response.status_code == 200 and "diffbank_http_requests_total" in response.text
    assert world.client.get("/v1/jobs").status_code == 401  # only /metrics is keyless


def test_reads_and_predictions_go_on_while_the_broker_is_down(
    tmp_path, redis_server, tiny_base_dir
):
    world = make_world(tmp_path, redis_server.url, tiny_base_dir)
    world.publish_version("alice", "served", seed=3)
    dataset = world.upload_ok("alice", SENTIMENT_ROWS)["id"]
    waiting = world.counts()["train_queue"]
    world.app.state.celery.conf.broker_url = f"redis://127.0.0.1:{free_port()}/0"
    world.app.state.celery.pool.force_close_all()
    assert world.client.get("/v1/tasks", headers=world.headers("alice")).status_code == 200
    predicted = world.client.post(
        "/v1/tasks/served/predict", headers=world.headers("alice"), json={"inputs": ["fine"]}
    )
    assert predicted.status_code == 200, predicted.text
    queued = world.client.post(
        "/v1/jobs",
        headers=world.headers("alice"),
        json={"task": "later", "dataset_id": dataset, "epochs": 1, "fix_epochs": 1},
    )
    assert queued.status_code == 202, queued.text  # kept queued: the sweep sends it later
    assert queued.json()["state"] == "queued"
    assert world.counts()["train_queue"] == waiting  # nothing reached the (real) broker
