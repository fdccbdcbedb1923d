"""Datasets, jobs and tasks through the HTTP API over real SQLite, file store and Redis."""

from __future__ import annotations

import hashlib
import json

import pytest
import redis

from tests.api_support import (
    SENTIMENT_ROWS,
    jsonl,
    publish_artifact,
    random_artifact,
    register_base,
)
from tests.api_support import world as world  # noqa: F401  (module-scoped fixture)
from tests.fixtures.models import make_tiny_bert

pytestmark = pytest.mark.services


def test_upload_validates_stores_and_answers_the_dataset(world):
    data = jsonl(SENTIMENT_ROWS)
    response = world.upload("alice", "reviews.jsonl", data)
    assert response.status_code == 201, response.text
    dataset = response.json()
    assert dataset["sha256"] == hashlib.sha256(data).hexdigest()
    assert dataset["rows"] == len(SENTIMENT_ROWS)
    assert dataset["labels"] == ["neg", "pos"]
    assert dataset["task_type"] == "classification"
    assert dataset["filename"] == "reviews.jsonl" and dataset["format"] == "jsonl"
    got = world.client.get(f"/v1/datasets/{dataset['id']}", headers=world.headers("alice"))
    assert got.json() == dataset
    stored = world.store.get(
        f"datasets/{dataset['sha256'][:2]}/{dataset['sha256'][2:4]}/{dataset['sha256']}.jsonl",
        sha256=dataset["sha256"],
    )
    assert stored == data


def test_upload_with_column_mapping_reads_a_csv_pair_task(world):
    csv = "premise,hypothesis,gold\nit rains,the street is wet,yes\nit is sunny,it rains,no\n"
    response = world.upload(
        "alice",
        "pairs.csv",
        csv.encode(),
        text_field="premise",
        text_pair_field="hypothesis",
        label_field="gold",
    )
    assert response.status_code == 201, response.text
    dataset = response.json()
    assert dataset["task_type"] == "pair-classification"
    assert (dataset["text_field"], dataset["text_pair_field"], dataset["label_field"]) == (
        "premise",
        "hypothesis",
        "gold",
    )


def test_datasets_list_is_per_tenant_and_paginated(world):
    ids = [world.upload_ok("bob", SENTIMENT_ROWS[: 4 + i])["id"] for i in range(3)]
    first = world.client.get("/v1/datasets?limit=2", headers=world.headers("bob")).json()
    assert [d["id"] for d in first["items"]] == ids[::-1][:2]
    second = world.client.get(
        f"/v1/datasets?limit=2&cursor={first['next_cursor']}", headers=world.headers("bob")
    ).json()
    assert [d["id"] for d in second["items"]] == [ids[0]]
    assert second["next_cursor"] is None
    alice_ids = {
        d["id"]
        for d in world.client.get("/v1/datasets?limit=500", headers=world.headers("alice")).json()[
            "items"
        ]
    }
    assert alice_ids.isdisjoint(ids)


def test_deleting_a_dataset_removes_its_row_and_blob(world):
    dataset = world.upload_ok("alice", SENTIMENT_ROWS + [{"text": "unique row", "label": "pos"}])
    before = world.counts()
    response = world.client.delete(f"/v1/datasets/{dataset['id']}", headers=world.headers("alice"))
    assert response.status_code == 204
    after = world.counts()
    assert after["datasets"] == before["datasets"] - 1
    assert after["objects"] == before["objects"] - 1
    assert (
        world.client.get(
            f"/v1/datasets/{dataset['id']}", headers=world.headers("alice")
        ).status_code
        == 404
    )


def test_a_deleted_datasets_id_is_never_handed_out_again(world):
    deleted = world.upload_ok("alice", SENTIMENT_ROWS + [{"text": "reused?", "label": "neg"}])
    response = world.client.delete(f"/v1/datasets/{deleted['id']}", headers=world.headers("alice"))
    assert response.status_code == 204
    other = world.upload_ok("bob", SENTIMENT_ROWS)
    assert other["id"] > deleted["id"]
    gone = world.client.get(f"/v1/datasets/{deleted['id']}", headers=world.headers("alice"))
    assert gone.status_code == 404


def test_creating_a_job_commits_it_then_queues_one_train_message(world):
    dataset = world.upload_ok("alice", SENTIMENT_ROWS)
    queue = redis.Redis.from_url(world.redis_url)
    before = queue.llen("train")
    response = world.client.post(
        "/v1/jobs",
        headers=world.headers("alice"),
        json={"task": "queued-task", "dataset_id": dataset["id"], "density": 0.01, "epochs": 2},
    )
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["state"] == "queued" and job["kind"] == "train" and job["task"] == "queued-task"
    assert job["params"] == {"density": 0.01, "epochs": 2}
    assert job["base_model"] == world.base_dir.name  # the public name, never the server path
    assert queue.llen("train") == before + 1
    message = json.loads(queue.lindex("train", 0))
    assert message["headers"]["task"] == "diffbank.train"
    assert json.loads(message["headers"]["argsrepr"]) == [job["id"]]
    events = world.client.get(f"/v1/jobs/{job['id']}/events", headers=world.headers("alice"))
    assert [(e["seq"], e["kind"], e["payload"]["state"]) for e in events.json()["items"]] == [
        (1, "state", "queued")
    ]


def test_jobs_are_listed_newest_first_with_filters_and_a_cursor(world):
    dataset = world.upload_ok("bob", SENTIMENT_ROWS)
    ids = []
    for task in ("list-a", "list-b", "list-a"):
        response = world.client.post(
            "/v1/jobs",
            headers=world.headers("bob"),
            json={"task": task, "dataset_id": dataset["id"]},
        )
        ids.append(response.json()["id"])
    page = world.client.get("/v1/jobs?task=list-a&limit=1", headers=world.headers("bob")).json()
    assert [j["id"] for j in page["items"]] == [ids[2]]
    page = world.client.get(
        f"/v1/jobs?task=list-a&limit=1&cursor={page['next_cursor']}", headers=world.headers("bob")
    ).json()
    assert [j["id"] for j in page["items"]] == [ids[0]]
    queued = world.client.get(
        "/v1/jobs?state=queued&kind=train&limit=500", headers=world.headers("bob")
    ).json()["items"]
    assert set(ids) <= {j["id"] for j in queued}
    others = world.client.get("/v1/jobs?limit=500", headers=world.headers("alice")).json()
    assert set(ids).isdisjoint({j["id"] for j in others["items"]})


def test_cancelling_a_queued_job_ends_it_cancelled_with_an_event(world):
    dataset = world.upload_ok("alice", SENTIMENT_ROWS)
    job = world.client.post(
        "/v1/jobs",
        headers=world.headers("alice"),
        json={"task": "to-cancel", "dataset_id": dataset["id"]},
    ).json()
    response = world.client.post(f"/v1/jobs/{job['id']}/cancel", headers=world.headers("alice"))
    assert response.status_code == 200
    assert response.json()["state"] == "cancelled"
    events = world.client.get(
        f"/v1/jobs/{job['id']}/events?after=1", headers=world.headers("alice")
    ).json()["items"]
    assert [e["payload"].get("state") for e in events] == ["cancelled"]


def test_job_for_a_task_on_another_base_is_a_conflict(world, tmp_path):
    other_dir = make_tiny_bert(tmp_path / "other-base", seed=7)
    register_base(world.session_factory, other_dir)
    world.publish_version("alice", "on-tiny", seed=11)
    dataset = world.upload_ok("alice", SENTIMENT_ROWS)
    before = world.counts()
    response = world.client.post(
        "/v1/jobs",
        headers=world.headers("alice"),
        json={"task": "on-tiny", "dataset_id": dataset["id"], "base_model": "other-base"},
    )
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "base_model_mismatch"
    assert response.json()["error"]["field"] == "base_model"
    assert world.counts() == before
    accepted = world.client.post(
        "/v1/jobs",
        headers=world.headers("alice"),
        json={"task": "new-on-other", "dataset_id": dataset["id"], "base_model": "other-base"},
    )
    assert accepted.status_code == 202
    assert accepted.json()["base_model"] == "other-base"  # its name, not the server's path


def test_interference_over_a_diff_that_cannot_be_read_is_a_conflict_naming_the_task(
    world, tmp_path
):
    other_dir = make_tiny_bert(tmp_path / "elsewhere", seed=8)
    world.publish_version("bob", "fits", seed=31)
    foreign = random_artifact(
        other_dir, seed=32, task_type="classification", labels=("neg", "pos"), density=0.02
    )  # made on another base, published for a task on this one
    publish_artifact(
        world, "bob", "foreign", foreign, task_type="classification", labels=["neg", "pos"]
    )
    response = world.client.get("/v1/interference?tasks=fits,foreign", headers=world.headers("bob"))
    assert response.status_code == 409, response.text
    error = response.json()["error"]
    assert error["code"] == "artifact_mismatch" and error["field"] == "tasks"
    assert "'foreign'" in error["message"] and "wrong base" in error["message"]


def test_task_versions_list_metrics_and_lineage_and_the_active_one(world):
    first = world.publish_version("bob", "versioned", seed=21)
    second = world.publish_version("bob", "versioned", seed=22)
    task = world.client.get("/v1/tasks/versioned", headers=world.headers("bob")).json()
    assert task["active_version"] == second and task["task_type"] == "classification"
    assert task["base_model"] == world.base_dir.name
    versions = world.client.get(
        "/v1/tasks/versioned/versions", headers=world.headers("bob")
    ).json()["items"]
    assert [(v["number"], v["active"]) for v in versions] == [(first, False), (second, True)]
    assert versions[0]["metrics"] == {"accuracy": 0.5}
    assert set(versions[0]["lineage"]) == {
        "source_job_id",
        "consolidation_run_id",
        "parent_version",
    }
    names = [
        t["name"]
        for t in world.client.get("/v1/tasks", headers=world.headers("bob")).json()["items"]
    ]
    assert "versioned" in names


def test_diff_download_streams_verified_bytes_with_etag_and_ranges(world):
    number = world.publish_version("alice", "download-me", seed=31)
    version = world.client.get(
        "/v1/tasks/download-me/versions", headers=world.headers("alice")
    ).json()["items"][-1]
    full = world.client.get("/v1/tasks/download-me/diff", headers=world.headers("alice"))
    assert full.status_code == 200
    assert hashlib.sha256(full.content).hexdigest() == version["sha256"]
    assert full.headers["x-diffbank-sha256"] == version["sha256"]
    assert full.headers["etag"] == f'"{version["sha256"]}"'
    assert full.headers["x-diffbank-version"] == str(number)
    part = world.client.get(
        "/v1/tasks/download-me/diff", headers={**world.headers("alice"), "Range": "bytes=10-19"}
    )
    assert part.status_code == 206
    assert part.content == full.content[10:20]
    assert part.headers["content-range"] == f"bytes 10-19/{len(full.content)}"
    tail = world.client.get(
        "/v1/tasks/download-me/diff", headers={**world.headers("alice"), "Range": "bytes=-5"}
    )
    assert tail.content == full.content[-5:]
    for ignored in ("items=0-1", "bytes=0-1,5-6"):  # other units, several ranges: whole file
        whole = world.client.get(
            "/v1/tasks/download-me/diff", headers={**world.headers("alice"), "Range": ignored}
        )
        assert whole.status_code == 200 and whole.content == full.content
    cached = world.client.get(
        "/v1/tasks/download-me/diff",
        headers={**world.headers("alice"), "If-None-Match": full.headers["etag"]},
    )
    assert cached.status_code == 304
    # A file store cannot presign: presign=1 streams the same bytes.
    presigned = world.client.get(
        "/v1/tasks/download-me/diff?presign=1", headers=world.headers("alice")
    )
    assert presigned.status_code == 200 and presigned.content == full.content


STALE_ETAG = '"' + "0" * 64 + '"'
IF_RANGE_CASES = [
    # (id, If-Range given the current ETag, status): a resume must never stitch two artifacts
    ("current_etag", lambda etag: etag, 206),
    ("stale_etag", lambda etag: STALE_ETAG, 200),
    ("weak_form_of_the_current_etag", lambda etag: f"W/{etag}", 200),
    ("http_date", lambda etag: "Wed, 21 Oct 2015 07:28:00 GMT", 200),
]


@pytest.mark.parametrize(
    "if_range,status", [c[1:] for c in IF_RANGE_CASES], ids=[c[0] for c in IF_RANGE_CASES]
)
def test_if_range_serves_the_range_only_for_the_current_etag(world, if_range, status):
    world.publish_version("alice", "resume-me", seed=33)
    full = world.client.get("/v1/tasks/resume-me/diff", headers=world.headers("alice"))
    etag = full.headers["etag"]
    response = world.client.get(
        "/v1/tasks/resume-me/diff",
        headers={**world.headers("alice"), "Range": "bytes=0-5", "If-Range": if_range(etag)},
    )
    assert response.status_code == status, response.text
    expected = full.content[:6] if status == 206 else full.content
    assert response.content == expected
    assert response.headers["content-length"] == str(len(expected))
    assert response.headers["etag"] == etag


# Every GET route: HEAD answers what GET answers, headers included, without a body.
HEAD_PATHS = [
    ("health", "/healthz", "alice"),
    ("datasets", "/v1/datasets", "alice"),
    ("jobs", "/v1/jobs", "alice"),
    ("tasks", "/v1/tasks", "alice"),
    ("task", "/v1/tasks/head-me", "alice"),
    ("versions", "/v1/tasks/head-me/versions", "alice"),
    ("diff", "/v1/tasks/head-me/diff", "alice"),
    ("diff_version", "/v1/tasks/head-me/diff?version=1", "alice"),
    ("stats", "/v1/tasks/head-me/stats", "alice"),
    ("keys", "/v1/keys", "admin"),
    ("unknown_task", "/v1/tasks/no-such-task/diff", "alice"),
    ("without_a_key", "/v1/tasks/head-me/diff", None),
]


@pytest.mark.parametrize("path,who", [c[1:] for c in HEAD_PATHS], ids=[c[0] for c in HEAD_PATHS])
def test_head_answers_like_get_without_a_body(world, path, who):
    if world.client.get("/v1/tasks/head-me", headers=world.headers("alice")).status_code == 404:
        world.publish_version("alice", "head-me", seed=35)
    headers = world.headers(who) if who else {}
    got = world.client.get(path, headers=headers)
    head = world.client.head(path, headers=headers)
    assert head.status_code == got.status_code != 405, head.text
    assert head.content == b""
    drop = {"date"}
    assert {k: v for k, v in head.headers.items() if k not in drop} == {
        k: v for k, v in got.headers.items() if k not in drop
    }


def test_every_get_route_answers_head(world):
    paths = [p for p, ops in world.app.openapi()["paths"].items() if "get" in ops]
    assert len(paths) >= 15
    for template in paths:
        path = template.replace("{", "").replace("}", "")  # any value: a 404 or 422 is fine
        got = world.client.get(path, headers=world.headers("admin"))
        head = world.client.head(path, headers=world.headers("admin"))
        assert head.status_code == got.status_code != 405, template
        assert head.content == b""


def test_stats_count_nonzeros_per_layer(world):
    world.publish_version("alice", "stats-task", seed=41)
    stats = world.client.get("/v1/tasks/stats-task/stats", headers=world.headers("alice")).json()
    assert sum(stats["nonzeros_per_layer"].values()) == stats["nnz"] > 0
    assert set(stats["nonzeros_per_layer"]) == {"embeddings", "layer 0", "layer 1", "pooler"}
    assert stats["density"] == pytest.approx(stats["nnz"] / stats["n_params"])


def test_deleting_the_active_version_activates_the_previous_and_removes_the_blob(world):
    first = world.publish_version("alice", "deletable", seed=51)
    second = world.publish_version("alice", "deletable", seed=52)
    before = world.counts()
    response = world.client.delete(
        f"/v1/tasks/deletable/versions/{second}", headers=world.headers("alice")
    )
    assert response.status_code == 204
    after = world.counts()
    assert after["task_versions"] == before["task_versions"] - 1
    assert after["objects"] == before["objects"] - 1
    task = world.client.get("/v1/tasks/deletable", headers=world.headers("alice")).json()
    assert task["active_version"] == first
    gone = world.client.get(
        f"/v1/tasks/deletable/diff?version={second}", headers=world.headers("alice")
    )
    assert gone.status_code == 404


def test_diff_on_an_s3_store_streams_or_redirects_to_a_presigned_url(
    tmp_path, redis_server, tiny_base_dir, moto_s3_server
):
    import httpx

    from tests.api_support import make_world
    from tests.fixtures.backends import make_s3_bucket

    s3 = make_world(
        tmp_path,
        redis_server.url,
        tiny_base_dir,
        store_url=f"s3://{make_s3_bucket(moto_s3_server)}/diffbank",
        s3_endpoint_url=moto_s3_server.endpoint_url,
        s3_region="us-east-1",
    )
    assert s3.upload_ok("alice", SENTIMENT_ROWS)["rows"] == len(SENTIMENT_ROWS)
    s3.publish_version("alice", "on-s3", seed=61)
    streamed = s3.client.get("/v1/tasks/on-s3/diff", headers=s3.headers("alice"))
    assert streamed.status_code == 200
    sha = streamed.headers["x-diffbank-sha256"]
    assert hashlib.sha256(streamed.content).hexdigest() == sha
    redirect = s3.client.get(
        "/v1/tasks/on-s3/diff?presign=1", headers=s3.headers("alice"), follow_redirects=False
    )
    assert redirect.status_code == 307
    assert redirect.headers["x-diffbank-sha256"] == sha
    presigned = httpx.get(redirect.headers["location"])
    assert presigned.status_code == 200 and presigned.content == streamed.content
