"""Prometheus metrics of the API: request counts and latency by route, jobs by state, serving."""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily
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
            "Inputs predicted, by task type (never by task name: names are tenants' data).",
            ["task_type"],
            registry=self.registry,
        )

    def watch_jobs(self, count_jobs_by_state: Callable[[], dict[str, int]]) -> None:
        """Expose `diffbank_jobs{state=...}`, read from the registry at scrape time."""
        self.registry.register(_JobsByStateCollector(count_jobs_by_state))

    def watch_serving(self, predictor, batcher) -> None:
        """Expose the decoded-diff cache and the batcher's queue, read at scrape time."""
        self.registry.register(_ServingCollector(predictor, batcher))

    def watch_stages(self, stages, caches: dict) -> None:
        """Expose per-stage predict time and the registry caches' hits, read at scrape time."""
        self.registry.register(_StagesCollector(stages, caches))


class _StagesCollector:
    """`diffbank_predict_stage_{cpu,wall}_seconds{stage}` summaries; registry cache counters."""

    def __init__(self, stages, caches: dict) -> None:
        self._stages = stages
        self._caches = caches  # name -> EpochCache

    def describe(self) -> list:
        """No metrics up front: values are read at scrape time."""
        return []

    def collect(self):
        """Per stage: requests observed (`_count`) and seconds spent in all (`_sum`)."""
        snapshot = self._stages.snapshot()
        for index, kind in ((1, "cpu"), (2, "wall")):
            family = SummaryMetricFamily(
                f"diffbank_predict_stage_{kind}_seconds",
                f"{kind.upper()} seconds of prediction requests by stage (forward and heads: "
                "each request's share of its batch; queue_wait has no CPU).",
                labels=["stage"],
            )
            for stage, totals in snapshot.items():
                family.add_metric([stage], count_value=totals[0], sum_value=totals[index])
            yield family
        for key, help_text in (
            ("hits", "Registry cache hits (key -> principal, task -> served version)."),
            ("misses", "Registry cache misses (answered from the database)."),
        ):
            family = CounterMetricFamily(
                f"diffbank_registry_cache_{key}", help_text, labels=["cache"]
            )
            for name, cache in sorted(self._caches.items()):
                family.add_metric([name], getattr(cache, key))
            yield family


class _ServingCollector:
    """Diff-cache hits, misses, evictions, resident bytes; batch and queue counts."""

    def __init__(self, predictor, batcher) -> None:
        self._predictor = predictor
        self._batcher = batcher

    def describe(self) -> list:
        """No metrics up front: values are read at scrape time."""
        return []

    def collect(self):
        """The serving counters and gauges."""
        cache = self._predictor.cache_stats()
        for key, help_text in (
            ("hits", "Decoded-diff cache hits."),
            ("misses", "Decoded-diff cache misses (artifact fetched, verified, decoded)."),
            ("evictions", "Decoded diffs evicted to stay within the cache's bytes."),
        ):
            family = CounterMetricFamily(f"diffbank_serving_cache_{key}", help_text)
            family.add_metric([], cache[key])
            yield family
        yield GaugeMetricFamily(
            "diffbank_serving_cache_resident_bytes",
            "Bytes of decoded diffs and heads resident.",
            value=cache["bytes"],
        )
        yield GaugeMetricFamily(
            "diffbank_serving_cache_resident_diffs",
            "Decoded diffs resident.",
            value=cache["entries"],
        )
        batcher = self._batcher
        yield GaugeMetricFamily(
            "diffbank_serving_queue_depth", "Requests waiting for a batch.", value=batcher.depth
        )
        for key, value, help_text in (
            ("batches", batcher.batches, "Mixed batches run."),
            ("batched_requests", batcher.batched_requests, "Requests run in mixed batches."),
            ("batched_rows", batcher.batched_rows, "Inputs run in mixed batches."),
            ("rejected", batcher.rejected, "Requests refused with 503 (queue full)."),
        ):
            family = CounterMetricFamily(f"diffbank_serving_{key}", help_text)
            family.add_metric([], value)
            yield family


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
