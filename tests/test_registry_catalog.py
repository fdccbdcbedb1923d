"""Catalog operations on a real database (SQLite and PostgreSQL): tenants, keys, datasets,
tasks and versions, jobs and their events, consolidation runs."""

from __future__ import annotations

import hashlib
import time

import pytest

from registry import catalog
from registry.catalog import ConflictError, InvalidInputError, NotFoundError
from registry.models import Job
from registry.publish import publish_version, store_dataset
from registry.stores import FileStore


@pytest.fixture
def objects(tmp_path):
    return FileStore(tmp_path / "objects")


@pytest.fixture
def tenant(session):
    return catalog.get_or_create_tenant(session, name="acme")


@pytest.fixture
def other_tenant(session):
    return catalog.get_or_create_tenant(session, name="globex")


@pytest.fixture
def base(session):
    return catalog.register_base_model(
        session, name="tiny-bert", source="/models/tiny", fingerprint="a" * 64, n_params=1000
    )


def make_dataset(session, objects, tenant_id, content=b'{"text":"hi","label":"pos"}\n'):
    return store_dataset(
        session,
        objects,
        tenant_id=tenant_id,
        data=content,
        filename="train.jsonl",
        format="jsonl",
        rows=1,
        label_names=["neg", "pos"],
        task_type="classification",
        column_mapping={"text_field": "text", "label_field": "label"},
    )


def make_task(session, tenant_id, base_id, name="sentiment"):
    return catalog.get_or_create_task(
        session,
        tenant_id=tenant_id,
        name=name,
        base_model_id=base_id,
        task_type="classification",
        label_names=["neg", "pos"],
    )


def publish(session, objects, task_id, payload: bytes, **fields):
    return publish_version(
        session,
        objects,
        task_id=task_id,
        diff_bytes=payload,
        nnz=10,
        density=0.01,
        metrics={"accuracy": 0.9},
        config={"density": 0.01},
        **fields,
    )


# --- tenants, base models, keys ---------------------------------------------------------------


def test_tenant_is_created_once_by_name(session):
    first = catalog.get_or_create_tenant(session, name="acme")
    again = catalog.get_or_create_tenant(session, name="acme")
    assert first.id == again.id


def test_base_model_with_a_different_fingerprint_is_refused(session, base):
    same = catalog.register_base_model(
        session, name="tiny-bert", source="/elsewhere", fingerprint="a" * 64, n_params=1000
    )
    assert same.id == base.id
    with pytest.raises(ConflictError) as err:
        catalog.register_base_model(
            session, name="tiny-bert", source="/x", fingerprint="b" * 64, n_params=1000
        )
    assert err.value.field == "base_model"


def test_api_key_authenticates_to_its_tenant_and_scopes(session, tenant):
    row, key = catalog.create_api_key(session, tenant_id=tenant.id, scopes=["submit", "read"])
    found = catalog.authenticate_api_key(session, key=key)
    assert found is not None
    found_tenant, scopes = found
    assert found_tenant.name == "acme" and scopes == ["read", "submit"]
    assert key not in (row.key_hash, row.prefix)  # only a hash is stored
    assert row.key_hash == hashlib.sha256(key.encode()).hexdigest()


def test_wrong_malformed_and_revoked_keys_do_not_authenticate(session, tenant):
    row, key = catalog.create_api_key(session, tenant_id=tenant.id, scopes=["read"])
    assert (
        catalog.authenticate_api_key(session, key=key[:-1] + ("A" if key[-1] != "A" else "B"))
        is None
    )
    assert catalog.authenticate_api_key(session, key="garbage") is None
    assert catalog.authenticate_api_key(session, key="") is None
    catalog.revoke_api_key(session, tenant_id=tenant.id, key_id=row.id)
    assert catalog.authenticate_api_key(session, key=key) is None


def test_unknown_scope_is_rejected_naming_the_field(session, tenant):
    with pytest.raises(InvalidInputError) as err:
        catalog.create_api_key(session, tenant_id=tenant.id, scopes=["read", "root"])
    assert err.value.field == "scopes" and "root" in str(err.value)


# --- datasets -----------------------------------------------------------------------------------


def test_dataset_row_points_at_its_verified_blob(session, objects, tenant):
    content = b'{"text":"a","label":"x"}\n'
    dataset = make_dataset(session, objects, tenant.id, content)
    assert dataset.sha256 == hashlib.sha256(content).hexdigest()
    assert dataset.size_bytes == len(content)
    assert objects.get(dataset.object_key, sha256=dataset.sha256) == content
    again = catalog.get_dataset(session, tenant_id=tenant.id, dataset_id=dataset.id)
    assert again.column_mapping == {"text_field": "text", "label_field": "label"}
    assert again.label_names == ["neg", "pos"]


def test_other_tenants_dataset_is_not_found(session, objects, tenant, other_tenant):
    dataset = make_dataset(session, objects, tenant.id)
    with pytest.raises(NotFoundError):
        catalog.get_dataset(session, tenant_id=other_tenant.id, dataset_id=dataset.id)
    items, _ = catalog.list_datasets(session, tenant_id=other_tenant.id)
    assert items == []


def test_dataset_listing_pages_newest_first_with_an_opaque_cursor(session, objects, tenant):
    ids = [make_dataset(session, objects, tenant.id, f"row {i}\n".encode()).id for i in range(5)]
    seen, cursor = [], None
    while True:
        page, cursor = catalog.list_datasets(session, tenant_id=tenant.id, cursor=cursor, limit=2)
        seen += [d.id for d in page]
        if cursor is None:
            break
    assert seen == sorted(ids, reverse=True)


def test_bad_cursor_and_limit_name_their_field(session, tenant):
    with pytest.raises(InvalidInputError) as err:
        catalog.list_datasets(session, tenant_id=tenant.id, cursor="!!not-ours")
    assert err.value.field == "cursor"
    with pytest.raises(InvalidInputError) as err:
        catalog.list_jobs(session, tenant_id=tenant.id, limit=0)
    assert err.value.field == "limit"


def test_deleting_a_dataset_removes_its_blob_unless_another_row_shares_it(session, objects, tenant):
    first = make_dataset(session, objects, tenant.id, b"same content\n")
    second = make_dataset(session, objects, tenant.id, b"same content\n")
    assert first.object_key == second.object_key
    catalog.delete_dataset(session, objects, tenant_id=tenant.id, dataset_id=first.id)
    assert objects.head(second.object_key) is not None
    catalog.delete_dataset(session, objects, tenant_id=tenant.id, dataset_id=second.id)
    assert objects.head(second.object_key) is None
    with pytest.raises(NotFoundError):
        catalog.get_dataset(session, tenant_id=tenant.id, dataset_id=second.id)


def test_dataset_of_an_unfinished_job_cannot_be_deleted(session, objects, tenant):
    dataset = make_dataset(session, objects, tenant.id)
    catalog.create_job(
        session,
        tenant_id=tenant.id,
        kind="train",
        base_model="tiny-bert",
        params={},
        task_name="t",
        dataset_id=dataset.id,
    )
    with pytest.raises(ConflictError) as err:
        catalog.delete_dataset(session, objects, tenant_id=tenant.id, dataset_id=dataset.id)
    assert err.value.code == "dataset_in_use"
    assert objects.head(dataset.object_key) is not None


# --- tasks and versions -------------------------------------------------------------------------


def test_task_names_are_unique_per_tenant_not_globally(session, tenant, other_tenant, base):
    a = make_task(session, tenant.id, base.id)
    b = make_task(session, other_tenant.id, base.id)
    assert a.id != b.id
    assert make_task(session, tenant.id, base.id).id == a.id


def test_task_on_a_different_task_type_is_a_conflict(session, tenant, base):
    make_task(session, tenant.id, base.id)
    with pytest.raises(ConflictError) as err:
        catalog.get_or_create_task(
            session,
            tenant_id=tenant.id,
            name="sentiment",
            base_model_id=base.id,
            task_type="regression",
            label_names=[],
        )
    assert err.value.field == "task_type"


@pytest.mark.parametrize("name", ["", "../x", "a b", "x" * 200, "-lead"])
def test_bad_task_names_are_rejected(session, tenant, base, name):
    with pytest.raises(InvalidInputError) as err:
        make_task(session, tenant.id, base.id, name=name)
    assert err.value.field == "task"


def test_versions_number_up_and_the_newest_becomes_active(session, objects, tenant, base):
    task = make_task(session, tenant.id, base.id)
    v1 = publish(session, objects, task.id, b"diff one")
    v2 = publish(session, objects, task.id, b"diff two", parent_version_id=v1.id)
    assert (v1.number, v2.number) == (1, 2)
    assert catalog.get_task(session, tenant_id=tenant.id, name="sentiment").active_version == 2
    active = catalog.get_task_version(session, tenant_id=tenant.id, name="sentiment")
    assert active.id == v2.id and active.parent_version_id == v1.id
    assert objects.get(active.artifact.object_key, sha256=active.artifact.sha256) == b"diff two"


def test_activate_version_rolls_back_and_unknown_versions_are_not_found(
    session, objects, tenant, base
):
    task = make_task(session, tenant.id, base.id)
    publish(session, objects, task.id, b"one")
    publish(session, objects, task.id, b"two")
    catalog.activate_version(session, tenant_id=tenant.id, name="sentiment", number=1)
    assert catalog.get_task_version(session, tenant_id=tenant.id, name="sentiment").number == 1
    with pytest.raises(NotFoundError):
        catalog.activate_version(session, tenant_id=tenant.id, name="sentiment", number=9)


def test_deleting_a_version_removes_its_blob_and_numbers_are_never_reused(
    session, objects, tenant, base
):
    task = make_task(session, tenant.id, base.id)
    publish(session, objects, task.id, b"one")
    v2 = publish(session, objects, task.id, b"two")
    key = v2.artifact.object_key
    catalog.delete_task_version(session, objects, tenant_id=tenant.id, name="sentiment", number=2)
    assert objects.head(key) is None
    assert catalog.get_task(session, tenant_id=tenant.id, name="sentiment").active_version == 1
    v3 = publish(session, objects, task.id, b"three")
    assert v3.number == 3
    numbers = [
        v.number for v in catalog.list_task_versions(session, tenant_id=tenant.id, name="sentiment")
    ]
    assert numbers == [1, 3]


def test_other_tenants_task_is_not_found(session, objects, tenant, other_tenant, base):
    task = make_task(session, tenant.id, base.id)
    publish(session, objects, task.id, b"one")
    with pytest.raises(NotFoundError):
        catalog.get_task(session, tenant_id=other_tenant.id, name="sentiment")
    with pytest.raises(NotFoundError):
        catalog.get_task_version(session, tenant_id=other_tenant.id, name="sentiment")
    with pytest.raises(NotFoundError):
        catalog.delete_task_version(
            session, objects, tenant_id=other_tenant.id, name="sentiment", number=1
        )


def test_publishing_with_finish_job_completes_the_job_atomically(session, objects, tenant, base):
    task = make_task(session, tenant.id, base.id)
    job = catalog.create_job(
        session,
        tenant_id=tenant.id,
        kind="train",
        base_model="tiny-bert",
        params={},
        task_name="sentiment",
    )
    catalog.claim_job(session, job_id=job.id, worker_id="w1")
    version = publish(
        session,
        objects,
        task.id,
        b"diff",
        source_job_id=job.id,
        finish_job_id=job.id,
        worker_id="w1",
    )
    done = catalog.get_job(session, tenant_id=tenant.id, job_id=job.id)
    assert done.state == "succeeded" and done.result_version_id == version.id
    assert done.metrics == {"accuracy": 0.9}


def test_a_worker_that_lost_its_job_cannot_publish(session, objects, tenant, base):
    task = make_task(session, tenant.id, base.id)
    job = catalog.create_job(
        session,
        tenant_id=tenant.id,
        kind="train",
        base_model="tiny-bert",
        params={},
        task_name="sentiment",
    )
    catalog.claim_job(session, job_id=job.id, worker_id="w1")
    with pytest.raises(ConflictError) as err:
        publish(session, objects, task.id, b"diff", finish_job_id=job.id, worker_id="someone-else")
    assert err.value.code == "job_not_running"
    assert catalog.list_task_versions(session, tenant_id=tenant.id, name="sentiment") == []
    assert catalog.get_task(session, tenant_id=tenant.id, name="sentiment").active_version is None


# --- jobs ---------------------------------------------------------------------------------------


def new_job(session, tenant_id, **kw) -> Job:
    args = dict(
        tenant_id=tenant_id,
        kind="train",
        base_model="tiny-bert",
        params={"epochs": 1},
        task_name="sentiment",
    )
    args.update(kw)
    return catalog.create_job(session, **args)


def test_new_job_is_queued_with_a_first_state_event(session, tenant):
    job = new_job(session, tenant.id)
    assert (job.state, job.attempts, job.cancel_requested) == ("queued", 0, False)
    events = catalog.list_job_events(session, tenant_id=tenant.id, job_id=job.id)
    assert [(e.seq, e.kind, e.payload) for e in events] == [(1, "state", {"state": "queued"})]


def test_job_with_another_tenants_dataset_is_rejected(session, objects, tenant, other_tenant):
    dataset = make_dataset(session, objects, other_tenant.id)
    with pytest.raises(NotFoundError) as err:
        new_job(session, tenant.id, dataset_id=dataset.id)
    assert err.value.field == "dataset_id"


def test_claim_is_compare_and_set_a_duplicate_claim_is_a_no_op(session, tenant):
    job = new_job(session, tenant.id)
    claimed = catalog.claim_job(session, job_id=job.id, worker_id="w1")
    assert claimed is not None and claimed.state == "running" and claimed.attempts == 1
    assert claimed.worker_id == "w1"
    assert catalog.claim_job(session, job_id=job.id, worker_id="w2") is None
    assert catalog.claim_job(session, job_id=job.id, worker_id="w1") is None
    assert catalog.load_job(session, job_id=job.id).attempts == 1


def test_running_job_with_a_stale_heartbeat_can_be_taken_over(session, tenant):
    job = new_job(session, tenant.id)
    catalog.claim_job(session, job_id=job.id, worker_id="dead")
    time.sleep(0.05)
    taken = catalog.claim_job(session, job_id=job.id, worker_id="w2", stale_after_s=0.01)
    assert taken is not None and taken.worker_id == "w2" and taken.attempts == 2
    # The dead worker's progress and result are refused from now on.
    assert (
        catalog.record_progress(session, job_id=job.id, worker_id="dead", progress={"step": 1})
        is None
    )
    assert catalog.finish_job(session, job_id=job.id, state="succeeded", worker_id="dead") is None


def test_job_out_of_attempts_ends_failed_instead_of_looping(session, tenant):
    job = new_job(session, tenant.id, max_attempts=2)
    assert catalog.claim_job(session, job_id=job.id, worker_id="a") is not None
    time.sleep(0.02)
    assert catalog.claim_job(session, job_id=job.id, worker_id="b", stale_after_s=0.01) is not None
    time.sleep(0.02)
    assert catalog.claim_job(session, job_id=job.id, worker_id="c", stale_after_s=0.01) is None
    final = catalog.get_job(session, tenant_id=tenant.id, job_id=job.id)
    assert (final.state, final.error_code, final.attempts) == ("failed", "too_many_attempts", 2)
    assert final.finished_at is not None
    last = catalog.list_job_events(session, tenant_id=tenant.id, job_id=job.id)[-1]
    assert last.payload["state"] == "failed"


def test_progress_is_stored_and_becomes_an_event(session, tenant):
    job = new_job(session, tenant.id)
    catalog.claim_job(session, job_id=job.id, worker_id="w")
    progress = {"step": 5, "total_steps": 10, "loss": 0.5, "expected_nnz": 1234.0, "phase": "l0"}
    updated = catalog.record_progress(session, job_id=job.id, worker_id="w", progress=progress)
    assert updated.progress == progress
    events = catalog.list_job_events(session, tenant_id=tenant.id, job_id=job.id, after_seq=2)
    assert [(e.seq, e.kind, e.payload) for e in events] == [(3, "progress", progress)]
    assert catalog.heartbeat(session, job_id=job.id, worker_id="w") is not None


def test_finish_moves_running_to_final_state_once(session, tenant):
    job = new_job(session, tenant.id)
    catalog.claim_job(session, job_id=job.id, worker_id="w")
    failed = catalog.finish_job(
        session,
        job_id=job.id,
        state="failed",
        worker_id="w",
        error_code="bad_data",
        error_message="label column missing",
    )
    assert failed.state == "failed" and failed.error_code == "bad_data"
    assert catalog.finish_job(session, job_id=job.id, state="succeeded", worker_id="w") is None
    with pytest.raises(InvalidInputError):
        catalog.finish_job(session, job_id=job.id, state="queued")


def test_cancel_of_a_queued_job_is_immediate(session, tenant):
    job = new_job(session, tenant.id)
    cancelled = catalog.request_cancel(session, tenant_id=tenant.id, job_id=job.id)
    assert cancelled.state == "cancelled" and cancelled.finished_at is not None
    assert catalog.claim_job(session, job_id=job.id, worker_id="w") is None


def test_cancel_of_a_running_job_asks_its_worker(session, tenant):
    job = new_job(session, tenant.id)
    catalog.claim_job(session, job_id=job.id, worker_id="w")
    asked = catalog.request_cancel(session, tenant_id=tenant.id, job_id=job.id)
    assert asked.state == "running" and asked.cancel_requested
    seen = catalog.heartbeat(session, job_id=job.id, worker_id="w")
    assert seen.cancel_requested
    done = catalog.finish_job(session, job_id=job.id, state="cancelled", worker_id="w")
    assert done.state == "cancelled"
    with pytest.raises(NotFoundError):
        catalog.request_cancel(session, tenant_id=tenant.id + 999, job_id=job.id)


def test_stale_job_with_a_cancel_request_ends_cancelled_not_resumed(session, tenant):
    job = new_job(session, tenant.id)
    catalog.claim_job(session, job_id=job.id, worker_id="dead")
    catalog.request_cancel(session, tenant_id=tenant.id, job_id=job.id)
    time.sleep(0.02)
    assert catalog.claim_job(session, job_id=job.id, worker_id="w2", stale_after_s=0.01) is None
    assert catalog.load_job(session, job_id=job.id).state == "cancelled"


def test_job_listing_filters_by_state_task_and_kind(session, tenant, other_tenant):
    a = new_job(session, tenant.id, task_name="a")
    b = new_job(session, tenant.id, task_name="b")
    new_job(session, other_tenant.id, task_name="a")
    catalog.claim_job(session, job_id=b.id, worker_id="w")
    running, _ = catalog.list_jobs(session, tenant_id=tenant.id, state="running")
    assert [j.id for j in running] == [b.id]
    by_task, _ = catalog.list_jobs(session, tenant_id=tenant.id, task="a")
    assert [j.id for j in by_task] == [a.id]
    assert catalog.list_jobs(session, tenant_id=tenant.id, kind="consolidate")[0] == []
    with pytest.raises(InvalidInputError) as err:
        catalog.list_jobs(session, tenant_id=tenant.id, state="sleeping")
    assert err.value.field == "state"


def test_lost_jobs_are_stale_queued_or_stale_running(session, tenant):
    queued = new_job(session, tenant.id)
    running = new_job(session, tenant.id)
    fresh = new_job(session, tenant.id)
    catalog.claim_job(session, job_id=running.id, worker_id="w")
    time.sleep(0.05)
    catalog.mark_enqueued(session, job_id=fresh.id)
    lost = {j.id for j in catalog.find_lost_jobs(session, older_than_s=0.04)}
    assert lost == {queued.id, running.id}
    assert catalog.find_lost_jobs(session, older_than_s=3600) == []


def test_event_sequence_is_gapless_per_job(session, tenant):
    job = new_job(session, tenant.id)
    catalog.claim_job(session, job_id=job.id, worker_id="w")
    for step in range(3):
        catalog.record_progress(session, job_id=job.id, worker_id="w", progress={"step": step})
    catalog.finish_job(session, job_id=job.id, state="succeeded", worker_id="w")
    seqs = [e.seq for e in catalog.list_job_events(session, tenant_id=tenant.id, job_id=job.id)]
    assert seqs == [1, 2, 3, 4, 5, 6]


# --- consolidation runs -------------------------------------------------------------------------


def test_consolidation_run_creates_its_job_and_records_a_report(session, objects, tenant, base):
    for name in ("a", "b"):
        task = make_task(session, tenant.id, base.id, name=name)
        publish(session, objects, task.id, name.encode())
    run = catalog.create_consolidation_run(
        session, tenant_id=tenant.id, base_model="tiny-bert", budget=500, tolerance=1.0
    )
    assert run.task_names == ["a", "b"] and run.trigger == "api"
    assert run.job.kind == "consolidate" and run.job.state == "queued"
    assert catalog.get_consolidation_run_for_job(session, job_id=run.job_id).id == run.id
    shared = catalog.set_shared_artifact(session, run_id=run.id, stored=_put(objects, b"shared"))
    catalog.record_report(
        session, run_id=run.id, report={"tasks": []}, total_nnz_before=20, total_nnz_after=8
    )
    again = catalog.get_consolidation_run(session, tenant_id=tenant.id, run_id=run.id)
    assert again.shared_artifact_id == shared.id
    assert (again.total_nnz_before, again.total_nnz_after) == (20, 8)
    page, _ = catalog.list_consolidation_runs(session, tenant_id=tenant.id)
    assert [r.id for r in page] == [run.id]


def _put(objects, data: bytes):
    digest = hashlib.sha256(data).hexdigest()
    return objects.put(
        objects.content_key("artifacts", digest, ".safetensors"), data, sha256=digest
    )


def test_consolidation_of_unknown_or_unpublished_tasks_is_rejected(session, tenant, base):
    make_task(session, tenant.id, base.id, name="empty")
    with pytest.raises(NotFoundError) as err:
        catalog.create_consolidation_run(
            session, tenant_id=tenant.id, base_model="tiny-bert", budget=10, task_names=["nope"]
        )
    assert err.value.field == "tasks"
    with pytest.raises(InvalidInputError) as err:
        catalog.create_consolidation_run(
            session, tenant_id=tenant.id, base_model="tiny-bert", budget=10, task_names=["empty"]
        )
    assert err.value.field == "tasks"
    with pytest.raises(InvalidInputError) as err:
        catalog.create_consolidation_run(
            session, tenant_id=tenant.id, base_model="tiny-bert", budget=0, task_names=["empty"]
        )
    assert err.value.field == "budget"
    with pytest.raises(InvalidInputError) as err:
        catalog.create_consolidation_run(
            session, tenant_id=tenant.id, base_model="tiny-bert", budget=5, strategy="magic"
        )
    assert err.value.field == "strategy"
    assert catalog.list_jobs(session, tenant_id=tenant.id)[0] == []


HUGE_ID = 2**63 + 12345  # larger than any INTEGER column (what a fuzzer sends in a URL)


def test_ids_no_row_can_have_are_simply_not_found(session, objects, tenant, base):
    task = make_task(session, tenant.id, base.id)
    publish(session, objects, task.id, b"one")
    lookups = [
        lambda: catalog.get_dataset(session, tenant_id=tenant.id, dataset_id=HUGE_ID),
        lambda: catalog.get_job(session, tenant_id=tenant.id, job_id=HUGE_ID),
        lambda: catalog.request_cancel(session, tenant_id=tenant.id, job_id=-1),
        lambda: catalog.list_job_events(session, tenant_id=tenant.id, job_id=HUGE_ID),
        lambda: catalog.get_consolidation_run(session, tenant_id=tenant.id, run_id=HUGE_ID),
        lambda: catalog.get_task_version(
            session, tenant_id=tenant.id, name="sentiment", number=HUGE_ID
        ),
        lambda: catalog.activate_version(session, tenant_id=tenant.id, name="sentiment", number=0),
        lambda: catalog.delete_dataset(session, objects, tenant_id=tenant.id, dataset_id=HUGE_ID),
        lambda: catalog.create_job(
            session,
            tenant_id=tenant.id,
            kind="train",
            base_model="tiny-bert",
            params={},
            dataset_id=HUGE_ID,
        ),
    ]
    for lookup in lookups:
        with pytest.raises(NotFoundError):
            lookup()
    assert catalog.load_job(session, job_id=HUGE_ID) is None
    assert catalog.claim_job(session, job_id=HUGE_ID, worker_id="w") is None
    assert catalog.finish_job(session, job_id=HUGE_ID, state="failed") is None
