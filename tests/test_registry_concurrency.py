"""Concurrency on real databases with real processes: version numbers and job claims."""

from __future__ import annotations

import multiprocessing

import pytest

from registry import catalog

PUBLISHERS = 4
VERSIONS_EACH = 5
CLAIMERS = 4
JOBS = 8
REPORTERS = 3
PROGRESS_EACH = 10


@pytest.fixture(scope="module")
def spawn_pool():
    """A pool of spawned processes (and a manager for barriers) shared by this module's tests."""
    ctx = multiprocessing.get_context("spawn")
    size = max(PUBLISHERS, CLAIMERS, REPORTERS)
    with ctx.Manager() as manager, ctx.Pool(size) as pool:
        yield pool, manager


def run_together(spawn_pool, func, args_per_process: list[tuple]) -> list:
    """Run `func` once per argument tuple, all released at the same moment by a barrier."""
    pool, manager = spawn_pool
    barrier = manager.Barrier(len(args_per_process), timeout=120)
    return pool.starmap(func, [(*args, barrier) for args in args_per_process])


def _publish_versions(
    db_url: str, store_root: str, task_id: int, worker: int, barrier
) -> list[int]:
    from registry.db import make_engine, make_session_factory
    from registry.publish import publish_version
    from registry.stores import FileStore

    engine = make_engine(db_url)
    session = make_session_factory(engine)()
    store = FileStore(store_root)
    barrier.wait()
    numbers = []
    for i in range(VERSIONS_EACH):
        version = publish_version(
            session,
            store,
            task_id=task_id,
            diff_bytes=f"w{worker}-v{i}".encode(),
            nnz=1,
            density=0.1,
            metrics={"worker": worker},
            config={},
        )
        numbers.append(version.number)
    session.close()
    engine.dispose()
    return numbers


def _claim_all(db_url: str, job_ids: list[int], worker: int, barrier) -> list[int]:
    from registry.db import make_engine, make_session_factory

    engine = make_engine(db_url)
    session = make_session_factory(engine)()
    barrier.wait()
    won = [
        job_id
        for job_id in job_ids
        if catalog.claim_job(session, job_id=job_id, worker_id=f"worker-{worker}") is not None
    ]
    session.close()
    engine.dispose()
    return won


def _report_progress(db_url: str, job_id: int, worker: int, barrier) -> int:
    from registry.db import make_engine, make_session_factory

    engine = make_engine(db_url)
    session = make_session_factory(engine)()
    barrier.wait()
    for step in range(PROGRESS_EACH):
        progress = {"reporter": worker, "step": step}
        assert catalog.record_progress(session, job_id=job_id, worker_id="w", progress=progress)
    if worker == 0:
        catalog.request_cancel(
            session, tenant_id=catalog.load_job(session, job_id=job_id).tenant_id, job_id=job_id
        )
    session.close()
    engine.dispose()
    return worker


def test_concurrent_progress_reports_and_cancel_get_gapless_event_numbers(
    spawn_pool, session, db_url
):
    tenant = catalog.get_or_create_tenant(session, name="acme")
    job = catalog.create_job(session, tenant_id=tenant.id, kind="train", base_model="m", params={})
    catalog.claim_job(session, job_id=job.id, worker_id="w")
    run_together(spawn_pool, _report_progress, [(db_url, job.id, w) for w in range(REPORTERS)])
    events = catalog.list_job_events(session, tenant_id=tenant.id, job_id=job.id)
    expected = 2 + REPORTERS * PROGRESS_EACH + 1  # queued, running, progress..., cancel request
    assert [e.seq for e in events] == list(range(1, expected + 1))
    for w in range(REPORTERS):  # each reporter's steps appear in its own order
        steps = [e.payload["step"] for e in events if e.payload.get("reporter") == w]
        assert steps == list(range(PROGRESS_EACH))
    assert catalog.load_job(session, job_id=job.id).cancel_requested


def test_concurrent_publishers_get_distinct_consecutive_version_numbers(
    spawn_pool, session, db_url, tmp_path
):
    tenant = catalog.get_or_create_tenant(session, name="acme")
    base = catalog.register_base_model(
        session, name="m", source="/m", fingerprint="0" * 64, n_params=1
    )
    task = catalog.get_or_create_task(
        session,
        tenant_id=tenant.id,
        name="race",
        base_model_id=base.id,
        task_type="regression",
        label_names=[],
    )
    results = run_together(
        spawn_pool,
        _publish_versions,
        [(db_url, str(tmp_path / "objects"), task.id, w) for w in range(PUBLISHERS)],
    )
    total = PUBLISHERS * VERSIONS_EACH
    all_numbers = sorted(n for numbers in results for n in numbers)
    assert all_numbers == list(range(1, total + 1))
    for numbers in results:
        assert numbers == sorted(numbers)  # each publisher sees its own numbers grow
    stored = catalog.list_task_versions(session, tenant_id=tenant.id, name="race")
    assert [v.number for v in stored] == list(range(1, total + 1))
    assert catalog.get_task(session, tenant_id=tenant.id, name="race").active_version == total


def test_workers_racing_for_the_same_jobs_each_job_is_claimed_exactly_once(
    spawn_pool, session, db_url
):
    tenant = catalog.get_or_create_tenant(session, name="acme")
    job_ids = [
        catalog.create_job(session, tenant_id=tenant.id, kind="train", base_model="m", params={}).id
        for _ in range(JOBS)
    ]
    results = run_together(spawn_pool, _claim_all, [(db_url, job_ids, w) for w in range(CLAIMERS)])
    won = sorted(j for claimed in results for j in claimed)
    assert won == sorted(job_ids)  # every job has exactly one winner
    for job_id in job_ids:
        job = catalog.load_job(session, job_id=job_id)
        assert job.state == "running" and job.attempts == 1
        winners = [w for w, claimed in enumerate(results) if job_id in claimed]
        assert job.worker_id == f"worker-{winners[0]}"
        states = [
            e.payload["state"]
            for e in catalog.list_job_events(session, tenant_id=tenant.id, job_id=job_id)
        ]
        assert states == ["queued", "running"]


def _create_job_or_delete_dataset(
    db_url: str, store_root: str, tenant_id: int, dataset_id: int, role: str, barrier
) -> str:
    from registry.db import make_engine, make_session_factory
    from registry.stores import FileStore

    engine = make_engine(db_url)
    session = make_session_factory(engine)()
    barrier.wait()
    try:
        if role == "create":
            catalog.create_job(
                session,
                tenant_id=tenant_id,
                kind="train",
                task_name="t",
                dataset_id=dataset_id,
                base_model="m",
                params={},
            )
            return "created"
        catalog.delete_dataset(
            session, FileStore(store_root), tenant_id=tenant_id, dataset_id=dataset_id
        )
        return "deleted"
    except catalog.CatalogError as exc:
        return exc.code
    finally:
        session.close()
        engine.dispose()


def test_a_job_created_while_its_dataset_is_deleted_is_one_or_the_other_never_a_broken_row(
    spawn_pool, session, db_url, tmp_path
):
    from registry.stores import FileStore

    store = FileStore(tmp_path / "objects")
    tenant = catalog.get_or_create_tenant(session, name="acme")
    outcomes = set()
    for i in range(6):
        stored = store.put(store.content_key("datasets", f"{i:064x}", ".jsonl"), b"rows %d" % i)
        dataset = catalog.create_dataset(
            session,
            tenant_id=tenant.id,
            stored=stored,
            filename="d.jsonl",
            format="jsonl",
            rows=8,
            label_names=["a", "b"],
            task_type="classification",
            column_mapping={},
        )
        results = run_together(
            spawn_pool,
            _create_job_or_delete_dataset,
            [
                (db_url, str(tmp_path / "objects"), tenant.id, dataset.id, role)
                for role in ("create", "delete")
            ],
        )
        outcomes.add(tuple(results))
    assert outcomes <= {("created", "dataset_in_use"), ("not_found", "deleted")}
