"""Prometheus metrics of the server; multiprocess-aware (PROMETHEUS_MULTIPROC_DIR)."""

from __future__ import annotations

import os
import time

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

BUCKETS = (0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.5, 2.0)
AGE_BUCKETS = (0.0, 1.0, 10.0, 60.0, 300.0, 900.0, 1800.0, 2700.0, 3600.0, 7200.0)


class Metrics:
    """Request counts, latency histograms by endpoint, errors, the bundle version."""

    def __init__(self) -> None:
        self.multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        # in multiprocess mode the values live in files; a private registry keeps
        # tests that build several apps from clashing on metric names
        self.registry = REGISTRY if self.multiprocess else CollectorRegistry()
        self.requests = Counter(
            "recsys_http_requests",
            "HTTP requests",
            ["endpoint", "method", "status"],
            registry=self.registry,
        )
        self.errors = Counter(
            "recsys_http_errors",
            "HTTP responses with status >= 400",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "recsys_http_request_duration_seconds",
            "request latency",
            ["endpoint"],
            buckets=BUCKETS,
            registry=self.registry,
        )
        self.bundle = Gauge(
            "recsys_bundle_info",
            "the bundle being served (1 for its version)",
            ["version"],
            registry=self.registry,
            multiprocess_mode="liveall" if self.multiprocess else "all",
        )
        self.list_age = Histogram(
            "recsys_list_age_seconds",
            "seconds since a served list was ranked (0: ranked for the request)",
            buckets=AGE_BUCKETS,
            registry=self.registry,
        )
        self.refreshes = Counter(
            "recsys_list_refreshes",
            "lists recomputed off the read path (after events, near their time-to-live): "
            "done, failed, or current (ranked since it was asked, by a read or a worker); "
            "handed: an events request's users given to the refresher process",
            ["outcome"],
            registry=self.registry,
        )
        self._version: str | None = None
        self._children: dict[tuple[str, str, int], tuple[object, object, object | None]] = {}

    def observe(self, endpoint: str, method: str, status: int, t0: float) -> None:
        key = (endpoint, method, status)
        ch = self._children.get(key)
        if ch is None:
            ch = (
                self.requests.labels(endpoint, method, str(status)),
                self.latency.labels(endpoint),
                self.errors.labels(endpoint, str(status)) if status >= 400 else None,
            )
            self._children[key] = ch
        req, lat, err = ch
        req.inc()  # type: ignore[attr-defined]
        lat.observe(time.perf_counter() - t0)  # type: ignore[attr-defined]
        if err is not None:
            err.inc()  # type: ignore[attr-defined]

    def set_bundle(self, version: str) -> None:
        if version == self._version:
            return
        if self._version is not None:
            self.bundle.labels(self._version).set(0)
        self.bundle.labels(version).set(1)
        self._version = version

    def render(self) -> tuple[bytes, str]:
        if self.multiprocess:
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
