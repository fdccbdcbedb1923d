"""The predict path's registry caches (key -> principal, task -> served version) and the change
epoch that invalidates them: in-process rules, the epoch's transactions, and two real uvicorn
processes on one SQLite file where a change made through one applies in the other within 1 s.
Also the per-stage time of predictions that `/metrics` exposes (`bench/serving.py --stages`)."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from api.cache import EpochCache, EpochWatch
from registry import catalog
from tests.api_support import random_artifact, register_base
from tests.fixtures.services import prepare_registry, settings_from_env

PROPAGATION_BOUND_S = 1.0  # a change must apply in every API process within this


# -- in process: the generation rule -----------------------------------------------------------


class FakeClock:
    """A settable monotonic clock."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_entries_are_dropped_once_the_epoch_moves_and_rechecked_at_most_every_interval():
    epoch, clock = [0], FakeClock()
    watch = EpochWatch(lambda: epoch[0], check_s=0.5, clock=clock)
    cache: EpochCache[str, str] = EpochCache(watch)
    assert cache.peek("k") is None  # never read: due
    assert cache.get("k", lambda: "v1") == "v1"
    assert cache.peek("k") == "v1" and watch.reads == 1
    epoch[0] = 1  # another process committed a change
    clock.now += 0.4
    assert cache.peek("k") == "v1"  # within the interval: no query, possibly stale
    clock.now += 0.2
    assert cache.peek("k") is None  # due: peek never blocks, the caller goes to get()
    assert cache.get("k", lambda: "v2") == "v2" and watch.reads == 2
    assert cache.get("k", lambda: "never") == "v2" and watch.reads == 2


def test_a_row_loaded_before_a_change_is_not_served_after_the_next_check():
    epoch, clock = [0], FakeClock()
    watch = EpochWatch(lambda: epoch[0], check_s=0.5, clock=clock)
    cache: EpochCache[str, str] = EpochCache(watch)

    def slow_load() -> str:  # reads the old row; the change commits while it runs
        epoch[0] = 1
        clock.now += 0.6
        return "old"

    assert cache.get("k", slow_load) == "old"
    assert cache.get("k", lambda: "new") == "new"  # tagged with the generation read before


def test_absent_answers_are_not_cached_and_expire_forces_a_reread():
    epoch, clock = [0], FakeClock()
    watch = EpochWatch(lambda: epoch[0], check_s=0.5, clock=clock)
    cache: EpochCache[str, str] = EpochCache(watch, max_entries=2)
    calls = []
    assert cache.get("missing", lambda: calls.append(1)) is None
    assert cache.get("missing", lambda: calls.append(1)) is None
    assert len(calls) == 2
    for key in ("a", "b", "c"):
        cache.get(key, lambda key=key: key)
    assert len(cache) == 2 and cache.peek("a") is None  # bounded: the oldest went
    epoch[0] = 5
    watch.expire()  # a commit in this process
    assert cache.peek("c") is None
    assert cache.get("c", lambda: "c2") == "c2"


# -- the epoch commits with the change ----------------------------------------------------------


def _epoch(session_factory) -> int:
    with session_factory() as session:
        return catalog.read_change_epoch(session)


def test_revoke_publish_activate_and_delete_bump_the_epoch_in_their_transaction(
    session_factory, tiny_base_dir, tmp_path
):
    from diffs.read import loads_artifact
    from registry.publish import publish_version
    from registry.stores import open_store
    from registry.stores.base import StoredObject

    with session_factory() as session:
        tenant = catalog.get_or_create_tenant(session, name="acme")
        row, _ = catalog.create_api_key(session, tenant_id=tenant.id, scopes=["read"])
    before = _epoch(session_factory)
    with session_factory() as session:
        catalog.revoke_api_key(session, tenant_id=tenant.id, key_id=row.id)
    assert _epoch(session_factory) == before + 1
    with session_factory() as session:
        catalog.revoke_api_key(session, tenant_id=tenant.id, key_id=row.id)  # no change
    assert _epoch(session_factory) == before + 1

    store = open_store((tmp_path / "objects").as_uri())
    data = random_artifact(
        tiny_base_dir, seed=1, task_type="classification", labels=("neg", "pos"), density=0.02
    )
    diff = loads_artifact(data)
    base = register_base(session_factory, tiny_base_dir)
    with session_factory() as session:
        task = catalog.get_or_create_task(
            session,
            tenant_id=tenant.id,
            name="sentiment",
            base_model_id=base.id,
            task_type="classification",
            label_names=["neg", "pos"],
        )
        for _ in range(2):
            publish_version(
                session,
                store,
                task_id=task.id,
                diff_bytes=data,
                nnz=diff.nnz,
                density=diff.meta.density,
                metrics={},
                config={},
            )
    assert _epoch(session_factory) == before + 3
    with session_factory() as session:
        catalog.activate_version(session, tenant_id=tenant.id, name="sentiment", number=1)
        catalog.delete_task_version(session, store, tenant_id=tenant.id, name="sentiment", number=2)
    assert _epoch(session_factory) == before + 5
    with session_factory() as session:
        served = catalog.resolve_served_version(session, tenant_id=tenant.id, name="sentiment")
    assert served.number == 1 and served.task_type == "classification"
    assert served.base_source == str(tiny_base_dir) and len(served.artifacts) == 1

    with session_factory() as session:  # a publish that fails rolls its bump back too
        with pytest.raises(catalog.NotFoundError):
            catalog.publish_task_version(
                session,
                task_id=task.id,
                diff=StoredObject("k", "0" * 64, 1),
                nnz=1,
                density=0.1,
                metrics={},
                config={},
                shared_artifact_id=10**6,
            )
    assert _epoch(session_factory) == before + 5


# -- two API processes on one registry ----------------------------------------------------------


def _publish(settings, tenant_id: int, task: str, *, seed: int, activate: bool = True) -> int:
    """Publish a random version of `task` from this process, as a worker would; its number."""
    from diffs.read import loads_artifact
    from registry.db import get_session_factory
    from registry.publish import publish_version
    from registry.stores import open_store

    data = random_artifact(
        Path(settings.base_model),
        seed=seed,
        task_type="classification",
        labels=("neg", "pos"),
        density=0.02,
    )
    diff = loads_artifact(data)
    factory = get_session_factory(settings)
    base = register_base(factory, Path(settings.base_model))
    with factory() as session:
        row = catalog.get_or_create_task(
            session,
            tenant_id=tenant_id,
            name=task,
            base_model_id=base.id,
            task_type="classification",
            label_names=["neg", "pos"],
        )
        version = publish_version(
            session,
            open_store(settings.store_url, settings),
            task_id=row.id,
            diff_bytes=data,
            nnz=diff.nnz,
            density=diff.meta.density,
            metrics={},
            config={},
            activate=activate,
        )
    return version.number


def _new_key(settings, tenant: str, scopes: list[str]) -> tuple[int, int, str]:
    """(tenant id, key id, key) of a new key of `tenant` (created on first use)."""
    from registry.db import get_session_factory

    with get_session_factory(settings)() as session:
        row = catalog.get_or_create_tenant(session, name=tenant)
        key_row, key = catalog.create_api_key(session, tenant_id=row.id, scopes=scopes)
    return row.id, key_row.id, key


def _predict(url: str, key: str, task: str, **params: int) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/tasks/{task}/predict",
        params=params,
        json={"inputs": ["a wonderful film"]},
        headers={"Authorization": f"Bearer {key}"},
        timeout=120,  # the first prediction of a process loads torch and the base
    )


def _within_bound(condition, what: str) -> float:
    """Poll `condition` until true; the seconds it took (fails past the propagation bound)."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > PROPAGATION_BOUND_S:
            pytest.fail(f"{what} not seen within {PROPAGATION_BOUND_S} s")
        time.sleep(0.02)
    return time.monotonic() - started


def _metric(url: str, admin_key: str, name: str, labels: str) -> float:
    text = httpx.get(
        f"{url}/metrics", headers={"Authorization": f"Bearer {admin_key}"}, timeout=10
    ).text
    prefix = f"{name}{{{labels}}} "
    values = [float(line[len(prefix) :]) for line in text.splitlines() if line.startswith(prefix)]
    assert values, f"{prefix!r} not in /metrics"
    return values[0]


@pytest.fixture
def two_apis(service_env, api_server):
    """Two uvicorn processes A and B on one SQLite file and store; (settings, admin key, A, B)."""
    settings = settings_from_env(service_env)
    admin_key = prepare_registry(settings)
    return settings, admin_key, api_server(service_env), api_server(service_env)


def test_changes_through_one_process_apply_in_the_other_within_a_second(two_apis):
    settings, admin_key, a, b = two_apis
    tenant_id, key_id, reader_key = _new_key(settings, "acme", ["read"])
    assert _publish(settings, tenant_id, "sentiment", seed=1) == 1

    for _ in range(3):  # B now holds the reader's principal and the served version
        response = _predict(b.url, reader_key, "sentiment")
        assert response.status_code == 200, response.text
        assert response.json()["version"] == 1
    assert _metric(b.url, admin_key, "diffbank_registry_cache_hits_total", 'cache="principals"')
    assert _metric(b.url, admin_key, "diffbank_registry_cache_hits_total", 'cache="versions"')

    # A newly published version (by a third process, as a worker does) is what B serves.
    assert _publish(settings, tenant_id, "sentiment", seed=2) == 2
    _within_bound(
        lambda: _predict(b.url, reader_key, "sentiment").json()["version"] == 2,
        "version 2 served by B",
    )
    # A rollback through A.
    response = httpx.post(
        f"{a.url}/v1/tasks/sentiment/versions/1/activate",
        headers={"Authorization": f"Bearer {admin_key}"},
        timeout=10,
    )
    assert response.status_code == 200, response.text
    _within_bound(
        lambda: _predict(b.url, reader_key, "sentiment").json()["version"] == 1,
        "the rollback to version 1 served by B",
    )
    # A key revoked through A.
    assert _predict(b.url, reader_key, "sentiment").status_code == 200
    response = httpx.post(
        f"{a.url}/v1/keys/{key_id}/revoke",
        headers={"Authorization": f"Bearer {admin_key}"},
        timeout=10,
    )
    assert response.status_code == 200, response.text
    assert _predict(a.url, reader_key, "sentiment").status_code == 401  # A itself: at once
    _within_bound(
        lambda: _predict(b.url, reader_key, "sentiment").status_code == 401,
        "the revoked key refused by B",
    )
    refused = _predict(b.url, reader_key, "sentiment")
    assert refused.json()["error"]["code"] == "invalid_key"


def test_cached_principals_and_versions_never_cross_tenants(two_apis):
    settings, admin_key, _, b = two_apis
    acme_id, _, acme_key = _new_key(settings, "acme", ["read"])
    globex_id, _, globex_key = _new_key(settings, "globex", ["read"])
    _, _, initech_key = _new_key(settings, "initech", ["read"])
    assert _publish(settings, acme_id, "shared-name", seed=1) == 1
    for seed in (2, 3):
        _publish(settings, globex_id, "shared-name", seed=seed)  # globex serves version 2

    for _ in range(3):  # interleaved, so every answer after the first is a cache hit
        for key, expected in ((acme_key, 1), (globex_key, 2)):
            response = _predict(b.url, key, "shared-name")
            assert response.status_code == 200, response.text
            assert response.json()["version"] == expected
        missing = _predict(b.url, initech_key, "shared-name")
        assert missing.status_code == 404 and missing.json()["error"]["field"] == "task"
        assert _predict(b.url, acme_key, "shared-name", version=2).status_code == 404
        tasks = httpx.get(
            f"{b.url}/v1/tasks", headers={"Authorization": f"Bearer {globex_key}"}, timeout=10
        ).json()
        assert [t["name"] for t in tasks["items"]] == ["shared-name"]

    # The per-stage time of those predictions, as `bench/serving.py --stages` reads it.
    for stage in ("auth", "resolve", "tokenise", "queue_wait", "forward", "response"):
        count = _metric(
            b.url, admin_key, "diffbank_predict_stage_cpu_seconds_count", f'stage="{stage}"'
        )
        assert count >= 6, stage
        assert _metric(
            b.url, admin_key, "diffbank_predict_stage_wall_seconds_sum", f'stage="{stage}"'
        )
