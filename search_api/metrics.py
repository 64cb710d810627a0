"""Prometheus metrics: latency per route, time per stage, and what index is being served.

Each app gets its own registry (several apps live in one test process); `GET /metrics` exposes it
in the Prometheus text format. Route labels are route templates (`/images/{key:path}`), never raw
paths, so label cardinality stays bounded.
"""
from __future__ import annotations

import time
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.075, 0.1, 0.15,
                   0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# index_search: one search of the served index, whatever the backend (a remote one: one
# batched call); index_load: opening a newly published version; explain_map: the image
# tower's cells for GET /explain
STAGES = ("text_encode", "image_decode", "image_encode", "index_search", "image_fetch",
          "thumbnail", "index_load", "explain_map")


class IndexCollector:
    """Reads the served index, reload counters and store state from the service at scrape
    time."""

    def __init__(self, get_service: Callable):
        self.get_service = get_service

    def collect(self):
        service = self.get_service()
        holder = service.index if service is not None else None
        index = holder.current if holder is not None else None
        vectors = GaugeMetricFamily("search_api_index_vectors", "vectors in the served index")
        vectors.add_metric([], index.count if index else 0)
        yield vectors
        info = InfoMetricFamily("search_api_index", "served index version and the model that built it")
        if index is not None:
            info.add_metric([], {"version": index.version, "model_id": index.model_id})
        yield info
        loaded = GaugeMetricFamily("search_api_index_loaded_timestamp_seconds",
                                   "when the served index version was swapped in (unix time)")
        loaded.add_metric([], holder.loaded_at if holder is not None and holder.loaded_at else 0)
        yield loaded
        reloads = CounterMetricFamily("search_api_index_reloads",
                                      "index swaps (ok) and refused/failed loads (error)",
                                      labels=["result"])
        counts = holder.reload_counts if holder is not None else {}
        for result in ("ok", "error"):
            reloads.add_metric([result], counts.get(result, 0))
        yield reloads
        store = GaugeMetricFamily("search_api_store_up",
                                  "1 if the object store answered the last time it was used")
        store.add_metric([], 1 if service is not None and service.images.store_ok else 0)
        yield store


class Metrics:
    def __init__(self, get_service: Callable):
        self.registry = CollectorRegistry()
        self.request_seconds = Histogram(
            "search_api_request_duration_seconds", "request latency per route",
            ["method", "route"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.requests = Counter(
            "search_api_requests", "requests per route and status code",
            ["method", "route", "status"], registry=self.registry)
        self.in_flight = Gauge("search_api_requests_in_flight", "requests being answered",
                               registry=self.registry)
        self.stage_seconds = Histogram(
            "search_api_stage_duration_seconds",
            "time per stage: " + ", ".join(STAGES), ["stage"], buckets=LATENCY_BUCKETS, registry=self.registry)
        for s in STAGES:  # present (at zero) before first use
            self.stage_seconds.labels(s)
        self.registry.register(IndexCollector(get_service))

    def observe_stage(self, name: str, seconds: float) -> None:
        self.stage_seconds.labels(name).observe(seconds)


class MetricsMiddleware:
    """Pure ASGI: times every HTTP request and labels it with the matched route template."""

    def __init__(self, app, metrics: Metrics):
        self.app = app
        self.metrics = metrics
        self._cache: dict[tuple, tuple] = {}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500
        m = self.metrics

        async def send_wrapper(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        t0 = time.perf_counter()
        m.in_flight.inc()
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            m.in_flight.dec()
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            method = scope.get("method", "GET")
            seconds, count = self._children(method, route, status)
            seconds.observe(time.perf_counter() - t0)
            count.inc()

    def _children(self, method: str, route: str, status: int):
        """The labelled series of one (method, route, status), looked up once: `labels()` takes
        a lock and builds a key on every call. Bounded: routes are templates."""
        key = (method, route, status)
        children = self._cache.get(key)
        if children is None:
            m = self.metrics
            children = self._cache[key] = (m.request_seconds.labels(method, route),
                                           m.requests.labels(method, route, str(status)))
        return children
