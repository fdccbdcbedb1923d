"""`create_app(settings)`: the diffbank HTTP API (FastAPI), wired to the registry, store and broker.

Importing this module never imports torch; prediction serving loads it on first use.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from sqlalchemy import func, select

from api.cache import EpochCache, EpochWatch
from api.deps import cached_principals, lookup_principal
from api.errors import install_error_handlers
from api.guard import RequestGuard
from api.head_requests import HeadAsGet
from api.metrics import ApiMetrics, MetricsMiddleware
from api.routes import consolidations, datasets, health, interference, jobs, keys, tasks
from serving.batcher import DynamicBatcher
from serving.engine import Predictor
from serving.stages import StageStats
from settings import Settings, get_settings

log = logging.getLogger(__name__)

API_VERSION = "0.1.0"
OPENAPI_DESCRIPTION = """
Continual task adaptation as sparse diffs against one shared encoder.

Every `/v1` route takes `Authorization: Bearer KEY` (scopes `read`, `submit`, `admin`; `admin`
implies the others). A tenant sees only its own datasets, tasks and jobs: another tenant's ids and
names answer 404. Every error is `{"error": {"code", "message", "field"}}`.
"""

GUARDED_PREFIXES = ("/v1/", "/metrics")  # behind RequestGuard: key checked, body capped
# What every guarded route may answer before or beside its own errors: 400 (two Authorization
# headers, a body that is not JSON), 401 (no or a bad key), 413 (a body over the cap).
GUARD_STATUSES = (400, 401, 413)
ERROR_SCHEMA = "#/components/schemas/ErrorPublic"
# Statuses a route answers that its module does not declare (yet).
EXTRA_STATUSES = {
    ("POST", "/v1/tasks/{name}/predict"): (503,),  # the batch queue is full (Retry-After)
    ("GET", "/metrics"): (403,),  # a key without the admin scope
}


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    """On shutdown: stop the batcher's runner thread (waiting requests fail) and close the pool."""
    yield
    await asyncio.to_thread(app.state.batcher.close)
    app.state.engine.dispose()


def create_app(settings: Settings | None = None) -> FastAPI:
    """The API app; refuses to start when the database schema is not current."""
    from registry.db import check_schema_current, make_engine, make_session_factory
    from registry.stores import open_store
    from worker.app import make_celery_app

    settings = settings or get_settings()
    engine = make_engine(settings.database_url)
    check_schema_current(engine)  # raises SchemaNotCurrentError naming the command to run

    app = FastAPI(
        title="diffbank",
        version=API_VERSION,
        description=OPENAPI_DESCRIPTION,
        lifespan=_lifespan,
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.session_factory = make_session_factory(engine)
    app.state.read_session_factory = make_session_factory(engine, reads_only=True)
    app.state.store = open_store(settings.store_url, settings)
    app.state.upload_dir = str(settings.upload_dir)  # temp files of uploads in flight
    os.makedirs(app.state.upload_dir, exist_ok=True)
    app.state.celery = make_celery_app(settings)
    app.state.predictor = Predictor(
        cache_size=settings.serving_cache_size,
        cache_bytes=settings.serving_cache_bytes,
        device=settings.serving_device,
        kernel=settings.serving_kernel,
        threads=settings.serving_threads,
    )
    app.state.stage_stats = StageStats()
    _install_registry_caches(app, settings)
    app.state.batcher = DynamicBatcher(
        app.state.predictor,
        stages=app.state.stage_stats,
        max_requests=settings.serving_batch_max_requests,
        max_rows=settings.serving_batch_max_rows,
        max_wait_s=settings.serving_batch_wait_ms / 1000,
        max_queue=settings.serving_queue_size,
        retry_after_s=settings.serving_retry_after_s,
    )
    app.state.metrics = ApiMetrics()
    app.state.metrics.watch_jobs(lambda: _count_jobs_by_state(app))
    app.state.metrics.watch_serving(app.state.predictor, app.state.batcher)
    app.state.metrics.watch_stages(
        app.state.stage_stats,
        {"principals": app.state.principals, "versions": app.state.served_versions},
    )

    install_error_handlers(app)
    peek, lookup = cached_principals(
        app.state.principals, lookup_principal(app.state.read_session_factory)
    )
    app.add_middleware(
        RequestGuard,
        lookup=lookup,
        peek=peek,
        max_json_bytes=settings.max_json_bytes,
        max_upload_bytes=settings.max_upload_bytes,
        guarded_prefixes=GUARDED_PREFIXES,
        keyless_clients={"/metrics": frozenset(settings.metrics_hosts)},
    )
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    app.add_middleware(HeadAsGet)  # outermost: everything inside sees a GET
    app.include_router(health.router)
    for module in (datasets, jobs, tasks, consolidations, interference, keys):
        app.include_router(module.router, prefix="/v1")
    declare_error_statuses(app)
    return app


def _install_registry_caches(app: FastAPI, settings: Settings) -> None:
    """Key -> principal and task -> served version caches, both dropped when the epoch moves."""
    from registry import catalog

    def read_epoch() -> int:
        with app.state.read_session_factory() as session:
            return catalog.read_change_epoch(session)

    # One epoch row re-read at most every check_s, rather than TTLs: changes are rare, so
    # entries live until one happens, and one SELECT per interval serves every key and task.
    watch = EpochWatch(read_epoch, check_s=settings.registry_cache_check_s)
    catalog.watch_local_changes(watch)  # this process's own commits apply at once
    app.state.change_watch = watch
    app.state.principals = EpochCache(watch, max_entries=settings.registry_cache_entries)
    app.state.served_versions = EpochCache(watch, max_entries=settings.registry_cache_entries)


def declare_error_statuses(app: FastAPI) -> None:
    """Document in OpenAPI the guard's statuses on guarded routes, and `EXTRA_STATUSES`."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            _add_error_statuses(build())  # build() caches the schema it returns
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _add_error_statuses(schema: dict[str, Any]) -> None:
    """Add the JSON error response for each status an operation answers but does not list."""
    from http import HTTPStatus

    for path, operations in schema.get("paths", {}).items():
        guarded = set(GUARD_STATUSES) if path.startswith(GUARDED_PREFIXES) else set()
        for method, operation in operations.items():
            statuses = guarded | set(EXTRA_STATUSES.get((method.upper(), path), ()))
            responses = operation.setdefault("responses", {})
            for status in sorted(statuses):
                responses.setdefault(
                    str(status),
                    {
                        "description": HTTPStatus(status).phrase,
                        "content": {"application/json": {"schema": {"$ref": ERROR_SCHEMA}}},
                    },
                )


def _count_jobs_by_state(app: FastAPI) -> dict[str, int]:
    """Jobs per state across tenants (read at scrape time)."""
    from registry.models import JOB_STATES, Job

    counts = dict.fromkeys(JOB_STATES, 0)
    with app.state.session_factory() as session:
        for state, count in session.execute(select(Job.state, func.count()).group_by(Job.state)):
            counts[state] = count
    return counts
