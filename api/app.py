"""`create_app(settings)`: the diffbank HTTP API (FastAPI), wired to the registry, store and broker.

Importing this module never imports torch; prediction serving loads it on first use.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from sqlalchemy import func, select

from api.batcher import DynamicBatcher
from api.deps import lookup_principal
from api.errors import install_error_handlers
from api.guard import RequestGuard
from api.metrics import ApiMetrics, MetricsMiddleware
from api.routes import consolidations, datasets, health, interference, jobs, keys, tasks
from api.serving import Predictor
from registry.settings import Settings, get_settings

log = logging.getLogger(__name__)

API_VERSION = "0.1.0"
OPENAPI_DESCRIPTION = """
Continual task adaptation as sparse diffs against one shared encoder.

Every `/v1` route takes `Authorization: Bearer KEY` (scopes `read`, `submit`, `admin`; `admin`
implies the others). A tenant sees only its own datasets, tasks and jobs: another tenant's ids and
names answer 404. Every error is `{"error": {"code", "message", "field"}}`.
"""


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
    )
    app.state.batcher = DynamicBatcher(
        app.state.predictor,
        max_requests=settings.serving_batch_max_requests,
        max_rows=settings.serving_batch_max_rows,
        max_wait_s=settings.serving_batch_wait_ms / 1000,
        max_queue=settings.serving_queue_size,
        retry_after_s=settings.serving_retry_after_s,
    )
    app.state.metrics = ApiMetrics()
    app.state.metrics.watch_jobs(lambda: _count_jobs_by_state(app))
    app.state.metrics.watch_serving(app.state.predictor, app.state.batcher)

    install_error_handlers(app)
    app.add_middleware(
        RequestGuard,
        lookup=lookup_principal(app.state.read_session_factory),
        max_json_bytes=settings.max_json_bytes,
        max_upload_bytes=settings.max_upload_bytes,
        guarded_prefixes=("/v1/", "/metrics"),
        keyless_clients={"/metrics": frozenset(settings.metrics_hosts)},
    )
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    app.include_router(health.router)
    for module in (datasets, jobs, tasks, consolidations, interference, keys):
        app.include_router(module.router, prefix="/v1")
    return app


def _count_jobs_by_state(app: FastAPI) -> dict[str, int]:
    """Jobs per state across tenants (read at scrape time)."""
    from registry.models import JOB_STATES, Job

    counts = dict.fromkeys(JOB_STATES, 0)
    with app.state.session_factory() as session:
        for state, count in session.execute(select(Job.state, func.count()).group_by(Job.state)):
            counts[state] = count
    return counts
