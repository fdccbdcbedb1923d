"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from api.deps import authorize
from api.errors import error_body
from api.schemas import ErrorPublic, HealthPublic, ReadyPublic

log = logging.getLogger(__name__)

router = APIRouter(tags=["health"])

_PROBE_KEY = "readyz/probe"  # never written; a `head` of it proves the store answers


@router.get("/healthz", response_model=HealthPublic)
def healthz() -> HealthPublic:
    """The process is up (no dependency is checked)."""
    return HealthPublic()


@router.get(
    "/readyz",
    response_model=ReadyPublic,
    responses={503: {"model": ErrorPublic, "description": "A dependency is not ready"}},
)
def readyz(request: Request) -> JSONResponse:
    """Checks the database, the object store and the broker; 503 names the failing one."""
    state = request.app.state
    checks = {
        "database": _check(lambda: _ping_database(state.engine)),
        "store": _check(lambda: state.store.head(_PROBE_KEY)),
        "broker": _check(lambda: _ping_broker(state.settings)),
    }
    failing = [name for name, result in checks.items() if result != "ok"]
    if not failing:
        return JSONResponse(ReadyPublic(status="ready", checks=checks).model_dump())
    message = "; ".join(f"{name}: {checks[name]}" for name in failing)
    body = error_body("not_ready", f"not ready: {message}", failing[0])
    body["checks"] = checks
    return JSONResponse(body, status_code=503)


@router.get("/metrics", response_class=Response)
def metrics(request: Request) -> Response:
    """Prometheus exposition: request counts and latency by route, jobs by state.

    Needs an admin key, unless the client's host is in `DIFFBANK_METRICS_ALLOWLIST`.
    """
    principal = getattr(request.state, "principal", None)
    if principal is not None:  # None: an allowlisted host, let through by the guard
        authorize(principal, "metrics.read")
    return Response(
        generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST
    )


def _check(probe) -> str:
    try:
        probe()
    except Exception as exc:  # a readiness probe reports any failure, it never raises
        # Unauthenticated callers see which dependency failed, not its hosts and ports.
        log.warning("readiness check failed: %s: %s", type(exc).__name__, exc)
        return f"failed ({type(exc).__name__})"
    return "ok"


def _ping_database(engine) -> None:
    from registry.db import check_schema_current

    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))
    check_schema_current(engine)


def _ping_broker(settings) -> None:
    import redis

    from worker.app import broker_url

    client = redis.Redis.from_url(broker_url(settings), socket_timeout=2, socket_connect_timeout=2)
    try:
        client.ping()
    finally:
        client.close()
