"""Prometheus metrics of the core.

Label values come only from configuration (model names of the catalogue, endpoints, status
classes), so a client cannot create series by inventing model names. With several worker
processes, ``PROMETHEUS_MULTIPROC_DIR`` is set by the CLI before this module is imported and
``/metrics`` aggregates all workers.
"""

from __future__ import annotations

import os
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

class _Children:
    """``metric.labels(...)`` memoised: prometheus_client validates and locks on every call,
    which showed in the per-request profile. Label values come from configuration, so the
    cache is bounded."""

    __slots__ = ("_cache", "_metric")

    def __init__(self, metric: Any) -> None:
        self._metric = metric
        self._cache: dict[tuple[str, ...], Any] = {}

    def labels(self, *values: str) -> Any:
        child = self._cache.get(values)
        if child is None:
            child = self._cache[values] = self._metric.labels(*values)
        return child


_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120,
)  # fmt: skip
_OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1)

REQUESTS = _Children(Counter(
    "gateway_requests_total",
    "Requests answered, by endpoint, public model, provider and status code.",
    ["endpoint", "model", "provider", "status"],
))
LATENCY = _Children(Histogram(
    "gateway_request_duration_seconds",
    "Total time from request to last byte.",
    ["endpoint", "model"],
    buckets=_LATENCY_BUCKETS,
))
UPSTREAM_LATENCY = _Children(Histogram(
    "gateway_upstream_duration_seconds",
    "Time spent waiting on the upstream (first attempt to last byte).",
    ["model", "provider"],
    buckets=_LATENCY_BUCKETS,
))
TTFT = _Children(Histogram(
    "gateway_time_to_first_token_seconds",
    "Time from request to the first streamed byte sent to the client.",
    ["model"],
    buckets=_LATENCY_BUCKETS,
))
OVERHEAD = _Children(Histogram(
    "gateway_overhead_seconds",
    "Time the gateway itself added (total minus upstream).",
    ["endpoint"],
    buckets=_OVERHEAD_BUCKETS,
))
TOKENS = _Children(Counter(
    "gateway_tokens_total", "Tokens by model and type.", ["model", "type"]
))
UPSTREAM_ERRORS = _Children(Counter(
    "gateway_upstream_errors_total",
    "Failed upstream attempts by deployment and error type.",
    ["deployment", "error"],
))
IN_FLIGHT = Gauge(
    "gateway_in_flight_requests",
    "Requests being handled now.",
    multiprocess_mode="livesum",
)
DISCONNECTS = Counter(
    "gateway_client_disconnects_total", "Clients that went away before the answer ended."
)


def render() -> tuple[bytes, str]:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST
