"""The scope matrix: every route of the OpenAPI document, with a key of each scope.

A key without the route's scope gets 403 `missing_scope` before anything is looked up or
changed; a key with it gets past authorization (whatever the answer about the resource).
A new route without a row here fails the test.
"""

from __future__ import annotations

import re

import pytest

from registry import catalog
from tests.api_support import make_world

pytestmark = pytest.mark.services

# (method, path) -> the scope the route needs; None: open to anyone (health, readiness).
ROUTE_SCOPES = {
    ("GET", "/healthz"): None,
    ("GET", "/readyz"): None,
    ("GET", "/metrics"): "admin",
    ("POST", "/v1/datasets"): "submit",
    ("GET", "/v1/datasets"): "read",
    ("GET", "/v1/datasets/{dataset_id}"): "read",
    ("DELETE", "/v1/datasets/{dataset_id}"): "submit",
    ("POST", "/v1/jobs"): "submit",
    ("GET", "/v1/jobs"): "read",
    ("GET", "/v1/jobs/{job_id}"): "read",
    ("POST", "/v1/jobs/{job_id}/cancel"): "submit",  # a training job; see the test below
    ("GET", "/v1/jobs/{job_id}/events"): "read",
    ("GET", "/v1/tasks"): "read",
    ("GET", "/v1/tasks/{name}"): "read",
    ("GET", "/v1/tasks/{name}/versions"): "read",
    ("DELETE", "/v1/tasks/{name}/versions/{number}"): "submit",
    ("GET", "/v1/tasks/{name}/diff"): "read",
    ("GET", "/v1/tasks/{name}/stats"): "read",
    ("POST", "/v1/tasks/{name}/versions/{number}/activate"): "submit",
    ("GET", "/v1/tasks/{name}/versions/{number}/parts"): "read",
    ("GET", "/v1/tasks/{name}/versions/{number}/parts/{role}"): "read",
    ("POST", "/v1/tasks/{name}/predict"): "read",
    ("POST", "/v1/consolidations"): "admin",
    ("GET", "/v1/consolidations"): "read",
    ("GET", "/v1/consolidations/{run_id}"): "read",
    ("POST", "/v1/consolidations/{run_id}/cancel"): "admin",
    ("GET", "/v1/interference"): "read",
    ("GET", "/v1/keys"): "admin",
    ("POST", "/v1/keys/{key_id}/revoke"): "admin",
}
GRANTS = {"read": {"read"}, "submit": {"read", "submit"}, "admin": {"read", "submit", "admin"}}
PATH_VALUES = {"dataset_id": "987654", "job_id": "987654", "run_id": "987654", "key_id": "987654"}
PATH_VALUES |= {"name": "no-such-task", "number": "1", "role": "shared"}


@pytest.fixture(scope="module")
def world(tmp_path_factory, redis_server, tiny_base_dir):
    """carol holds one key of each scope; a consolidation of hers waits in the queue."""
    world = make_world(tmp_path_factory.mktemp("scopes"), redis_server.url, tiny_base_dir)
    with world.session_factory() as session:
        carol = world.tenant_ids["admin"]
        for scope in ("read", "submit"):
            _, world.keys[f"carol-{scope}"] = catalog.create_api_key(
                session, tenant_id=carol, scopes=sorted(GRANTS[scope])
            )
    world.keys["carol-admin"] = world.keys["admin"]
    world.publish_version("admin", "t1", seed=1)
    world.publish_version("admin", "t2", seed=2)
    base = world.base_dir.name
    with world.session_factory() as session:
        world.run = catalog.create_consolidation_run(
            session, tenant_id=carol, base_model=base, budget=100, task_names=["t1", "t2"]
        )
    return world


def _send(world, method: str, path: str, who: str | None):
    url = re.sub(r"\{(\w+)\}", lambda m: PATH_VALUES[m.group(1)], path)
    headers = world.headers(who) if who else {}
    body = {} if method in ("POST", "PUT", "PATCH") else None
    return world.client.request(method, url, headers=headers, json=body)


def test_the_matrix_names_every_route_of_the_api(world):
    documented = {
        (method.upper(), path)
        for path, operations in world.app.openapi()["paths"].items()
        for method in operations
    }
    assert documented == set(ROUTE_SCOPES)


@pytest.mark.parametrize(("method", "path"), sorted(ROUTE_SCOPES), ids=lambda v: str(v))
def test_each_route_asks_its_scope_of_every_key(world, method, path):
    needed = ROUTE_SCOPES[(method, path)]
    if needed is None:
        assert _send(world, method, path, None).status_code not in (401, 403)
        return
    anonymous = _send(world, method, path, None)
    assert anonymous.status_code == 401, anonymous.text
    assert anonymous.json()["error"]["code"] == "missing_key"
    for scope, granted in GRANTS.items():
        response = _send(world, method, path, f"carol-{scope}")
        if needed in granted:
            assert response.status_code not in (401, 403), (scope, response.text)
        else:
            assert response.status_code == 403, (scope, response.text)
            assert response.json()["error"]["code"] == "missing_scope"


def test_a_submit_key_cannot_cancel_a_consolidation_through_the_jobs_route(world):
    job_id = world.run.job_id
    refused = world.client.post(f"/v1/jobs/{job_id}/cancel", headers=world.headers("carol-submit"))
    assert refused.status_code == 403, refused.text
    assert refused.json()["error"]["code"] == "missing_scope"
    assert "consolidations.cancel" in refused.json()["error"]["message"]
    job = world.client.get(f"/v1/jobs/{job_id}", headers=world.headers("carol-read")).json()
    assert job["cancel_requested"] is False and job["state"] == "queued"

    done = world.client.post(f"/v1/jobs/{job_id}/cancel", headers=world.headers("carol-admin"))
    assert done.status_code == 200, done.text
    assert done.json()["state"] == "cancelled"


def test_an_admin_lists_and_revokes_its_tenants_keys_only(world):
    listed = world.client.get("/v1/keys", headers=world.headers("carol-admin")).json()["items"]
    assert {k["tenant"] for k in listed} == {"carol"} and len(listed) == 4
    assert all("key" not in k for k in listed)
    reader = next(k for k in listed if k["prefix"] in world.keys["reader"])
    alice_keys = world.client.get("/v1/keys", headers=world.headers("admin")).json()["items"]
    assert all(k["tenant"] == "carol" for k in alice_keys)

    with world.session_factory() as session:
        [alice_key] = catalog.list_api_keys(session, tenant_id=world.tenant_ids["alice"])
    other = world.client.post(
        f"/v1/keys/{alice_key.id}/revoke", headers=world.headers("carol-admin")
    )
    assert other.status_code == 404  # another tenant's key is not there to revoke

    revoked = world.client.post(
        f"/v1/keys/{reader['id']}/revoke", headers=world.headers("carol-admin")
    )
    assert revoked.status_code == 200 and revoked.json()["revoked_at"] is not None
    gone = world.client.get("/v1/tasks", headers=world.headers("reader"))
    assert gone.status_code == 401 and gone.json()["error"]["code"] == "invalid_key"


def test_the_last_working_admin_key_of_a_tenant_cannot_be_revoked_over_http(world):
    listed = world.client.get("/v1/keys", headers=world.headers("carol-admin")).json()["items"]
    [admin] = [k for k in listed if "admin" in k["scopes"] and k["revoked_at"] is None]
    refused = world.client.post(
        f"/v1/keys/{admin['id']}/revoke", headers=world.headers("carol-admin")
    )
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "last_admin_key"
    assert world.client.get("/v1/keys", headers=world.headers("carol-admin")).status_code == 200
