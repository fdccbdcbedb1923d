"""Prometheus metrics of the API: request counts and latency by route, jobs by state."""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from starlette.routing import Match
from starlette.types import ASGIApp, Receive, Scope, Send

API_PREFIXES = ("/v1",)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ApiMetrics:
    """One Prometheus registry per app (tests create many apps in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "diffbank_http_requests_total",
            "HTTP requests answered, by method, route template and status code.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "diffbank_http_request_duration_seconds",
            "Time to answer an HTTP request, by method and route template.",
            ["method", "route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.predictions = Counter(
            "diffbank_predictions_total",
            "Inputs predicted, by task.",
            ["task"],
            registry=self.registry,
        )

    def watch_jobs(self, count_jobs_by_state: Callable[[], dict[str, int]]) -> None:
        """Expose `diffbank_jobs{state=...}`, read from the registry at scrape time."""
        self.registry.register(_JobsByStateCollector(count_jobs_by_state))


class _JobsByStateCollector:
    """A Prometheus collector reading the jobs-by-state gauge at scrape time."""

    def __init__(self, count_jobs_by_state: Callable[[], dict[str, int]]) -> None:
        self._count = count_jobs_by_state

    def describe(self) -> list:
        """No metrics up front: the gauge is only known at scrape time."""
        return []

    def collect(self):
        """The `diffbank_jobs` gauge, one sample per job state."""
        family = GaugeMetricFamily(
            "diffbank_jobs", "Jobs in the registry, by state.", labels=["state"]
        )
        for state, count in sorted(self._count().items()):
            family.add_metric([state], count)
        yield family


class MetricsMiddleware:
    """ASGI middleware timing each HTTP request under its route template (not its raw path)."""

    def __init__(self, app: ASGIApp, *, metrics: ApiMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status_holder = {"status": 500}

        async def send_wrapper(message: dict) -> None:
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
            await send(message)

        started = time.perf_counter()
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = _route_template(scope)
            method = scope.get("method", "GET")
            self.metrics.latency.labels(method, route).observe(time.perf_counter() - started)
            self.metrics.requests.labels(method, route, str(status_holder["status"])).inc()


def _route_template(scope: Scope) -> str:
    """The matched route's path template, so ids do not explode label cardinality."""
    route = scope.get("route")
    if route is not None:
        template = getattr(route, "path_format", None) or getattr(route, "path", "unmatched")
        # Routes of an included router carry their path relative to the include prefix.
        for prefix in API_PREFIXES:
            if scope.get("path", "").startswith(prefix + "/") and not template.startswith(prefix):
                template = prefix + template
        return template
    app = scope.get("app")
    for candidate in getattr(getattr(app, "router", None), "routes", []):
        match, _ = candidate.matches(scope)
        if match == Match.FULL:
            return getattr(candidate, "path", "unmatched")
    return "unmatched"
