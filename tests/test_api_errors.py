"""Every bad input gets a 4xx JSON error naming its code and field, and leaves nothing behind.

One table: each row sends one bad request and states the status, `error.code` and
`error.field` it must get. Before and after each request we count rows per table, stored
objects, upload temp files and messages in the broker's `train` queue: all must be unchanged.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from tests.api_support import SENTIMENT_ROWS, ApiWorld, jsonl, make_world

MAX_UPLOAD = 2048
MAX_JSON = 8192
MAX_COLUMNS = 8
MAX_BATCH = 4
MAX_CHARS = 200


@dataclass
class Ctx:
    """Ids and names the bad requests refer to."""

    world: ApiWorld
    alice_dataset: int
    bob_dataset: int
    busy_dataset: int
    three_label_dataset: int


@pytest.fixture(scope="module")
def ctx(tmp_path_factory, redis_server, tiny_base_dir) -> Ctx:
    world = make_world(
        tmp_path_factory.mktemp("api-errors"),
        redis_server.url,
        tiny_base_dir,
        max_upload_bytes=MAX_UPLOAD,
        max_json_bytes=MAX_JSON,
        max_columns=MAX_COLUMNS,
        serving_max_batch=MAX_BATCH,
        serving_max_text_chars=MAX_CHARS,
    )
    alice = world.upload_ok("alice", SENTIMENT_ROWS)["id"]
    bob = world.upload_ok("bob", SENTIMENT_ROWS)["id"]
    busy = world.upload_ok("alice", SENTIMENT_ROWS[:6] + SENTIMENT_ROWS[:2])["id"]
    response = world.client.post(
        "/v1/jobs", headers=world.headers("alice"), json={"task": "busy", "dataset_id": busy}
    )
    assert response.status_code == 202, response.text
    three = world.upload_ok("alice", SENTIMENT_ROWS + [{"text": "meh", "label": "mixed"}])["id"]
    world.publish_version("alice", "sent", seed=1)
    world.publish_version("alice", "scores", seed=2, task_type="regression", labels=())
    world.publish_version("bob", "bobtask", seed=3)
    return Ctx(world, alice, bob, busy, three)


def upload(name: str, data: bytes, who: str = "alice", **form: str):
    return lambda c: c.world.upload(who, name, data, **form)


def post_job(body: dict | Callable[[Ctx], dict], who: str = "alice"):
    def send(c: Ctx):
        payload = body(c) if callable(body) else body
        return c.world.client.post("/v1/jobs", headers=c.world.headers(who), json=payload)

    return send


def job(**fields):
    return lambda c: {"task": "sent", "dataset_id": c.alice_dataset, **fields}


def get(path: str, who: str | None = "alice", headers: dict | None = None):
    def send(c: Ctx):
        h = dict(c.world.headers(who)) if who else {}
        h.update(headers or {})
        return c.world.client.get(path, headers=h)

    return send


def predict(task: str, inputs, who: str = "alice"):
    return lambda c: c.world.client.post(
        f"/v1/tasks/{task}/predict", headers=c.world.headers(who), json={"inputs": inputs}
    )


def upload_streamed(name: str, data: bytes):
    """A multipart upload sent chunked, without Content-Length: the limit must hold mid-stream."""
    boundary = "diffbank-test-boundary"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
        f'filename="{name}"\r\nContent-Type: application/octet-stream\r\n\r\n'
    ).encode()
    body += data + f"\r\n--{boundary}--\r\n".encode()
    chunks = [body[i : i + 512] for i in range(0, len(body), 512)]
    return lambda c: c.world.client.post(
        "/v1/datasets",
        content=iter(chunks),
        headers={
            **c.world.headers("alice"),
            "Content-Type": f"multipart/form-data; boundary={boundary}",
        },
    )


def post_raw(path: str, body: bytes, who: str | None = "alice", *, chunked: bool = False):
    """POST raw bytes as JSON; `chunked` sends them without a Content-Length."""

    def send(c: Ctx):
        headers = {"Content-Type": "application/json", **(c.world.headers(who) if who else {})}
        content = iter([body[i : i + 4096] for i in range(0, len(body), 4096)]) if chunked else body
        return c.world.client.post(path, content=content, headers=headers)

    return send


def upload_truncated(name: str, data: bytes):
    """A multipart upload cut short: the file part never ends, the closing boundary never comes."""
    boundary = "diffbank-test-boundary"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
        f'filename="{name}"\r\nContent-Type: application/octet-stream\r\n\r\n'
    ).encode() + data[: len(data) // 2]
    return lambda c: c.world.client.post(
        "/v1/datasets",
        content=body,
        headers={
            **c.world.headers("alice"),
            "Content-Type": f"multipart/form-data; boundary={boundary}",
        },
    )


HUGE_JSON = b'{"inputs": ["' + b"x" * (4 * MAX_JSON) + b'"]}'
GARBAGE = b"\x00not json at all" * 1000
WIDE_CSV = (",".join(f"c{i}" for i in range(MAX_COLUMNS + 1)) + "\n").encode() * 3
WIDE_JSONL = jsonl([{"text": "t", "label": "a", **{f"k{i}": i for i in range(MAX_COLUMNS)}}])
ROWS_WITHOUT_LABEL = [{"text": r["text"]} for r in SENTIMENT_ROWS]
ONE_CLASS = [{"text": r["text"], "label": "pos"} for r in SENTIMENT_ROWS]
MALFORMED = jsonl(SENTIMENT_ROWS[:3]) + b'{"text": "broken", "label": \n'
OVERSIZE = jsonl(SENTIMENT_ROWS * 40)
PAIR_ROWS = [{**r, "text_pair": "a second text"} for r in SENTIMENT_ROWS]
SCORED_PAIRS = [{**r, "label": i / 2} for i, r in enumerate(PAIR_ROWS)]
assert len(OVERSIZE) > MAX_UPLOAD

CASES = [  # at least 15 kinds of bad input, by the brief
    # (id, request, status, code, field)
    ("wrong_file_type", upload("notes.txt", b"hello"), 422, "unsupported_format", "file"),
    ("oversize_upload", upload("big.jsonl", OVERSIZE), 413, "too_large", "file"),
    (
        "oversize_upload_streamed_without_length",
        upload_streamed("big.jsonl", OVERSIZE),
        413,
        "too_large",
        "file",
    ),
    ("malformed_row", upload("bad.jsonl", MALFORMED), 422, "malformed_row", "file"),
    (
        "missing_label_column",
        upload("t.jsonl", jsonl(ROWS_WITHOUT_LABEL)),
        422,
        "missing_column",
        "label",
    ),
    ("single_class", upload("t.jsonl", jsonl(ONE_CLASS)), 422, "single_class", "label"),
    ("empty_file", upload("t.jsonl", b""), 422, "empty_file", "file"),
    (
        "bad_task_type_form_field",
        upload("t.jsonl", jsonl(SENTIMENT_ROWS), task_type="poetry"),
        422,
        "invalid_task_type",
        "task_type",
    ),
    (
        "text_field_is_the_label_field",
        upload("t.jsonl", jsonl(SENTIMENT_ROWS), text_field="label"),
        422,
        "field_conflict",
        "label_field",
    ),
    (
        "label_field_is_the_text_field",
        upload("t.jsonl", jsonl(SENTIMENT_ROWS), label_field="text"),
        422,
        "field_conflict",
        "label_field",
    ),
    (
        "text_pair_field_is_the_text_field",
        upload("t.jsonl", jsonl(SENTIMENT_ROWS), text_pair_field="text"),
        422,
        "field_conflict",
        "text_pair_field",
    ),
    (
        "text_pair_field_is_the_label_field",
        upload("t.jsonl", jsonl(SENTIMENT_ROWS), text_pair_field="label"),
        422,
        "field_conflict",
        "text_pair_field",
    ),
    (
        "text_pair_field_for_single_text_classification",
        upload(
            "t.jsonl", jsonl(PAIR_ROWS), text_pair_field="text_pair", task_type="classification"
        ),
        422,
        "unused_text_pair",
        "text_pair_field",
    ),
    (
        "text_pair_field_for_regression",
        upload("t.jsonl", jsonl(SCORED_PAIRS), text_pair_field="text_pair", task_type="regression"),
        422,
        "unused_text_pair",
        "text_pair_field",
    ),
    (
        "text_pair_field_for_inferred_regression",
        upload("t.jsonl", jsonl(SCORED_PAIRS), text_pair_field="text_pair"),
        422,
        "unused_text_pair",
        "text_pair_field",
    ),
    (
        "unknown_form_field",
        upload("t.jsonl", jsonl(SENTIMENT_ROWS), colour="blue"),
        422,
        "unknown_field",
        "colour",
    ),
    (
        "upload_not_multipart",
        lambda c: c.world.client.post(
            "/v1/datasets", headers=c.world.headers("alice"), json={"file": "x"}
        ),
        415,
        "unsupported_media_type",
        "file",
    ),
    (
        "upload_without_file_part",
        lambda c: c.world.client.post(
            "/v1/datasets",
            headers=c.world.headers("alice"),
            files={"other": ("t.jsonl", io.BytesIO(b"{}"))},
        ),
        422,
        "missing_file",
        "file",
    ),
    (
        "unknown_base",
        post_job(job(base_model="no-such-encoder")),
        422,
        "unknown_base_model",
        "base_model",
    ),
    (
        "base_model_not_text",
        lambda c: c.world.client.post(
            "/v1/jobs",
            headers={**c.world.headers("alice"), "Content-Type": "application/json"},
            content=b'{"task": "sent", "dataset_id": %d, "base_model": "x\\ud800"}'
            % c.alice_dataset,
        ),
        422,
        "validation_error",
        "base_model",
    ),
    ("density_zero", post_job(job(density=0.0)), 422, "validation_error", "density"),
    ("density_above_one", post_job(job(density=1.5)), 422, "validation_error", "density"),
    ("job_body_not_json", post_raw("/v1/jobs", b'{"task": "sent",'), 400, "malformed_json", "body"),
    (
        "predict_body_not_json",
        post_raw("/v1/tasks/sent/predict", b"\x00"),
        400,
        "malformed_json",
        "body",
    ),
    ("epochs_zero", post_job(job(epochs=0)), 422, "validation_error", "epochs"),
    ("epochs_too_many", post_job(job(epochs=101)), 422, "validation_error", "epochs"),
    ("negative_lr", post_job(job(lr=-0.001)), 422, "validation_error", "lr"),
    ("batch_size_not_int", post_job(job(batch_size="lots")), 422, "validation_error", "batch_size"),
    ("unknown_hyperparameter", post_job(job(dropout=0.1)), 422, "validation_error", "dropout"),
    ("bad_task_name", post_job(job(task="no spaces allowed!")), 422, "validation_error", "task"),
    (
        "validation_label_unseen_in_training",
        post_job(
            lambda c: {
                "task": "sent",
                "dataset_id": c.alice_dataset,
                "validation_dataset_id": c.three_label_dataset,
            }
        ),
        422,
        "unknown_label",
        "validation_dataset_id",
    ),
    ("unknown_dataset", post_job(job(dataset_id=999_999)), 404, "not_found", "dataset_id"),
    (
        "other_tenants_dataset",
        post_job(lambda c: {"task": "x", "dataset_id": c.bob_dataset}),
        404,
        "not_found",
        "dataset_id",
    ),
    (
        "task_exists_with_other_task_type",
        post_job(lambda c: {"task": "scores", "dataset_id": c.alice_dataset}),
        409,
        "task_type_mismatch",
        "dataset_id",
    ),
    ("other_tenants_task", get("/v1/tasks/bobtask"), 404, "not_found", "task"),
    ("other_tenants_task_diff", get("/v1/tasks/bobtask/diff"), 404, "not_found", "task"),
    ("other_tenants_task_predict", predict("bobtask", ["hi"]), 404, "not_found", "task"),
    ("missing_key", get("/v1/jobs", who=None), 401, "missing_key", "Authorization"),
    (
        "wrong_key",
        get("/v1/jobs", who=None, headers={"Authorization": "Bearer dbk_000000000000_nope"}),
        401,
        "invalid_key",
        "Authorization",
    ),
    ("missing_scope", post_job(job(), who="reader"), 403, "missing_scope", "Authorization"),
    ("bad_cursor", get("/v1/jobs?cursor=not-a-cursor"), 422, "invalid", "cursor"),
    ("bad_state_filter", get("/v1/jobs?state=sleeping"), 422, "validation_error", "state"),
    ("empty_predict_inputs", predict("sent", []), 422, "validation_error", "inputs"),
    (
        "oversize_predict_batch",
        predict("sent", ["x"] * (MAX_BATCH + 1)),
        422,
        "too_many_inputs",
        "inputs",
    ),
    (
        "predict_text_too_long",
        predict("sent", ["ok", "x" * (MAX_CHARS + 1)]),
        422,
        "text_too_long",
        "inputs.1",
    ),
    (
        "predict_text_with_lone_surrogate",
        lambda c: c.world.client.post(
            "/v1/tasks/sent/predict",
            content=b'{"inputs": ["ok", "\\ud800"]}',
            headers={**c.world.headers("alice"), "Content-Type": "application/json"},
        ),
        422,
        "invalid_text",
        "inputs.1",
    ),
    ("pairs_for_single_text_task", predict("sent", [["a", "b"]]), 422, "invalid_inputs", "inputs"),
    ("unknown_version", get("/v1/tasks/sent/diff?version=7"), 404, "not_found", "version"),
    (
        "unsatisfiable_range",
        get("/v1/tasks/sent/diff", headers={"Range": "bytes=99999999-"}),
        416,
        "range_not_satisfiable",
        "Range",
    ),
    (
        "delete_dataset_in_use",
        lambda c: c.world.client.delete(
            f"/v1/datasets/{c.busy_dataset}", headers=c.world.headers("alice")
        ),
        409,
        "dataset_in_use",
        "dataset_id",
    ),
    ("unknown_job", get("/v1/jobs/424242"), 404, "not_found", "job_id"),
    # A hostile afternoon: limits and authentication come before any work.
    (
        "huge_garbage_body_without_a_key",
        post_raw("/v1/tasks/sent/predict", GARBAGE * 10, who=None),
        401,
        "missing_key",
        "Authorization",
    ),
    (
        "json_body_over_the_cap",
        post_raw("/v1/tasks/sent/predict", HUGE_JSON),
        413,
        "too_large",
        "body",
    ),
    (
        "json_body_over_the_cap_streamed_without_length",
        post_raw("/v1/jobs", HUGE_JSON, chunked=True),
        413,
        "too_large",
        "body",
    ),
    (
        "truncated_multipart",
        upload_truncated("t.jsonl", jsonl(SENTIMENT_ROWS)),
        422,
        "truncated_form",
        "file",
    ),
    ("csv_with_too_many_columns", upload("wide.csv", WIDE_CSV), 422, "too_many_columns", "file"),
    (
        "jsonl_row_with_too_many_keys",
        upload("w.jsonl", WIDE_JSONL),
        422,
        "too_many_columns",
        "file",
    ),
    (
        "json_route_body_over_the_cap_claiming_to_be_multipart",
        lambda c: c.world.client.post(
            "/v1/jobs",
            content=HUGE_JSON,
            headers={
                **c.world.headers("alice"),
                "Content-Type": "multipart/form-data; boundary=zz",
            },
        ),
        413,
        "too_large",
        "body",
    ),
    (
        "two_authorization_headers",
        lambda c: c.world.client.get(
            "/v1/tasks",
            headers=[
                ("Authorization", c.world.headers("bob")["Authorization"]),
                ("Authorization", c.world.headers("alice")["Authorization"]),
            ],
        ),
        400,
        "duplicate_authorization",
        "Authorization",
    ),
    ("task_name_with_a_nul", get("/v1/tasks/a%00b"), 404, "not_found", "task"),
    ("predict_on_a_task_name_with_a_nul", predict("a%00b", ["x"]), 404, "not_found", "task"),
    (
        "file_name_too_long",
        upload("x" * 300 + ".jsonl", jsonl(SENTIMENT_ROWS[:2])),
        422,
        "invalid_filename",
        "file",
    ),
    (
        "multipart_boundary_too_long",
        lambda c: c.world.client.post(
            "/v1/datasets",
            content=b"--" + b"b" * 1000 + b"--\r\n",
            headers={
                **c.world.headers("alice"),
                "Content-Type": "multipart/form-data; boundary=" + "b" * 1000,
            },
        ),
        422,
        "malformed_form",
        "file",
    ),
    (
        "validation_dataset_is_the_training_dataset",
        post_job(
            lambda c: {
                "task": "sent",
                "dataset_id": c.alice_dataset,
                "validation_dataset_id": c.alice_dataset,
            }
        ),
        422,
        "validation_error",
        None,
    ),
    (
        "boolean_as_a_dataset_id",
        post_job({"task": "sent", "dataset_id": True}),
        422,
        "validation_error",
        "dataset_id",
    ),
    ("string_as_an_epoch_count", post_job(job(epochs="2")), 422, "validation_error", "epochs"),
    (
        "density_that_keeps_no_parameter",
        post_job(job(density=1e-9)),
        422,
        "density_too_small",
        "density",
    ),
]


@pytest.mark.services
@pytest.mark.parametrize(
    "send,status,code,field", [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_request_gets_json_error_and_leaves_nothing_behind(ctx, send, status, code, field):
    before = ctx.world.counts()
    response = send(ctx)
    assert response.status_code == status, response.text
    assert status in declared_statuses(ctx.world.app, response.request), "not in the OpenAPI"
    error = response.json()["error"]
    assert error["code"] == code, error
    assert error["field"] == field, error
    assert error["message"]
    assert ctx.world.counts() == before


def declared_statuses(app, request) -> set[int]:
    """The statuses OpenAPI declares for the operation a request went to."""
    for template, operations in app.openapi()["paths"].items():
        pattern = re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(template))
        operation = operations.get(request.method.lower())
        if operation and re.fullmatch(pattern, request.url.path):
            return {int(status) for status in operation["responses"]}
    return set()
