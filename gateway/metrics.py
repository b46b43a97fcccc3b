"""Prometheus metrics of the core.

Label values come only from configuration (model names of the catalogue, endpoints, status
classes), so a client cannot create series by inventing model names. With several worker
processes, ``PROMETHEUS_MULTIPROC_DIR`` is set by the CLI before this module is imported and
``/metrics`` aggregates all workers.

The core's series are plain Python numbers, updated in place on every request.
prometheus_client's own ``Counter``/``Histogram`` validate, take a lock per value and scan the
buckets on every update (and in worker processes also write each value to a memory-mapped
file): the seven updates of a request cost about as much CPU as the rest of the accounting. In
one process a collector turns the numbers into the usual exposition at scrape time. A worker
process (``--workers``) moves what it counted into prometheus_client's multiprocess metrics,
whose files ``/metrics`` aggregates, once a second (``flush``: the gateway's periodic task),
before it answers a scrape itself, and when it stops: a scrape sees another worker's requests
at most a second late, and a worker that is killed (SIGKILL) loses at most its last second of
counts.
"""

from __future__ import annotations

import os
import time
import weakref
from bisect import bisect_left
from collections.abc import Iterator, Sequence
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

MULTIPROCESS = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


class _CounterChild:
    __slots__ = ("created", "sent", "shared", "value")

    def __init__(self, shared: Any = None) -> None:
        self.value = 0.0
        self.created = time.time()
        #: Worker processes: prometheus_client's child, and how much of ``value`` it has.
        self.shared = shared
        self.sent = 0.0

    def inc(self, amount: float = 1) -> None:
        # A counter never goes down; a negative amount (an upstream's odd usage) is ignored
        # rather than raised, so accounting cannot fail on it.
        if amount > 0:
            self.value += amount


class _HistogramChild:
    __slots__ = ("bounds", "counts", "created", "sent", "sent_sum", "shared", "sum")

    def __init__(self, bounds: tuple[float, ...], shared: Any = None) -> None:
        self.bounds = bounds
        self.counts = [0] * len(bounds)  # per bucket, not cumulative; the last is +Inf
        self.sum = 0.0
        self.created = time.time()
        #: Worker processes: prometheus_client's child, and the counts and sum it has.
        self.shared = shared
        self.sent = [0] * len(bounds)
        self.sent_sum = 0.0

    def observe(self, amount: float) -> None:
        self.sum += amount
        self.counts[bisect_left(self.bounds, amount)] += 1


class _Family:
    """One counter or histogram with labels: plain numbers, and in a worker process the
    prometheus_client metric (``shared``) that ``flush`` moves them into."""

    def __init__(
        self, name: str, doc: str, labelnames: Sequence[str],
        buckets: Sequence[float] | None = None,
    ) -> None:  # fmt: skip
        self.name = name.removesuffix("_total") if buckets is None else name
        self.doc = doc
        self.labelnames = tuple(labelnames)
        self.bounds = (*buckets, float("inf")) if buckets is not None else None
        self._children: dict[tuple[str, ...], Any] = {}
        self.shared: Any = None
        if MULTIPROCESS:
            if buckets is None:
                self.shared = Counter(name, doc, labelnames)
            else:
                self.shared = Histogram(name, doc, labelnames, buckets=buckets)
            _SHARED.append(self)

    def labels(self, *values: str) -> Any:
        child = self._children.get(values)
        if child is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name}: expected labels {self.labelnames}, got {values}")
            shared = self.shared
            if shared is not None and values:
                shared = shared.labels(*values)
            if self.bounds is None:
                child = _CounterChild(shared)
            else:
                child = _HistogramChild(self.bounds, shared)
            self._children[values] = child
        return child

    def flush(self) -> None:
        """Worker processes: add what was counted since the last flush to prometheus_client's
        values (the files ``/metrics`` aggregates)."""
        for child in list(self._children.values()):
            shared = child.shared
            if self.bounds is None:
                value = child.value
                if value > child.sent:
                    shared.inc(value - child.sent)
                    child.sent = value
                continue
            sent = child.sent
            moved = False
            for i, count in enumerate(child.counts):
                if count != sent[i]:
                    # (prometheus_client keeps a histogram as per-bucket counts and a sum, the
                    # values ``observe`` adds to one at a time)
                    shared._buckets[i].inc(count - sent[i])
                    sent[i] = count
                    moved = True
            if moved:
                shared._sum.inc(child.sum - child.sent_sum)
                child.sent_sum = child.sum

    def inc(self, amount: float = 1) -> None:
        """For a family without labels."""
        self.labels().inc(amount)

    def collect(self) -> Metric:
        # A copy first: a scrape from another thread may run while requests add children.
        children = list(self._children.items())
        if self.bounds is None:
            counter = CounterMetricFamily(self.name, self.doc, labels=self.labelnames)
            for values, child in children:
                counter.add_metric(values, child.value, created=child.created)
            if not children and not self.labelnames:
                counter.add_metric((), 0.0)  # (as prometheus_client exports a fresh counter)
            return counter
        hist = HistogramMetricFamily(self.name, self.doc, labels=self.labelnames)
        les = [floatToGoString(b) for b in self.bounds]
        for values, child in children:
            total, buckets = 0, []
            for le, count in zip(les, list(child.counts), strict=True):
                total += count
                buckets.append((le, total))
            hist.add_metric(values, buckets, child.sum)
            hist.add_sample(
                self.name + "_created", dict(zip(self.labelnames, values, strict=True)),
                child.created,
            )  # fmt: skip
        return hist


class _Summed:
    """A gauge that is an attribute its sources already keep (``Gateway.in_flight``,
    ``LedgerWriter.pending``), summed over the live ones of this process when read: no
    per-request update at all. In one process read at scrape time; in worker processes a
    ``livesum`` gauge (``shared``) that ``flush`` sets."""

    def __init__(self, name: str, doc: str, attr: str) -> None:
        self.name, self.doc, self.attr = name, doc, attr
        self.sources: weakref.WeakSet[Any] = weakref.WeakSet()
        self.shared: Gauge | None = None
        if MULTIPROCESS:
            self.shared = Gauge(name, doc, multiprocess_mode="livesum")

    def value(self) -> float:
        attr = self.attr
        return sum(getattr(s, attr) for s in list(self.sources))

    def collect(self) -> Metric:
        gauge = GaugeMetricFamily(self.name, self.doc)
        gauge.add_metric([], self.value())
        return gauge


class _Collector:
    def __init__(self) -> None:
        self.families: list[Any] = []

    def collect(self) -> Iterator[Metric]:
        for family in self.families:
            yield family.collect()


_COLLECTOR = _Collector()
#: Worker processes: the families ``flush`` moves into prometheus_client's metrics.
_SHARED: list[_Family] = []


def _counter(name: str, doc: str, labelnames: Sequence[str] = ()) -> Any:
    family = _Family(name, doc, labelnames)
    _COLLECTOR.families.append(family)
    return family


def own_counter(name: str, doc: str, labelnames: Sequence[str]) -> Any:
    """A counter with labels for another module (the ledger's cost): as the core's, but in one
    process with a collector of its own, registered now, since the registry learns a
    collector's metric names when it is registered."""
    family = _Family(name, doc, labelnames)
    if not MULTIPROCESS:
        collector = _Collector()
        collector.families.append(family)
        REGISTRY.register(collector)
    return family


def _histogram(name: str, doc: str, labelnames: Sequence[str], buckets: Sequence[float]) -> Any:
    family = _Family(name, doc, labelnames, buckets)
    _COLLECTOR.families.append(family)
    return family


_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120,
)  # fmt: skip
_OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1)

REQUESTS = _counter(
    "gateway_requests_total",
    "Requests answered, by endpoint, public model, provider and status code.",
    ["endpoint", "model", "provider", "status"],
)
LATENCY = _histogram(
    "gateway_request_duration_seconds",
    "Total time from request to last byte.",
    ["endpoint", "model"],
    _LATENCY_BUCKETS,
)
UPSTREAM_LATENCY = _histogram(
    "gateway_upstream_duration_seconds",
    "Time spent waiting on the upstream (first attempt to last byte).",
    ["model", "provider"],
    _LATENCY_BUCKETS,
)
TTFT = _histogram(
    "gateway_time_to_first_token_seconds",
    "Time from request to the first streamed byte sent to the client.",
    ["model"],
    _LATENCY_BUCKETS,
)
OVERHEAD = _histogram(
    "gateway_overhead_seconds",
    "Time the gateway itself added (total minus upstream).",
    ["endpoint"],
    _OVERHEAD_BUCKETS,
)
TOKENS = _counter("gateway_tokens_total", "Tokens by model and type.", ["model", "type"])
UPSTREAM_ERRORS = _counter(
    "gateway_upstream_errors_total",
    "Failed upstream attempts by deployment and error type.",
    ["deployment", "error"],
)
DISCONNECTS = _counter(
    "gateway_client_disconnects_total", "Clients that went away before the answer ended."
)
FAILED_STREAMS = _counter(
    "gateway_failed_streams_total",
    "Streams that failed after their 200 went out (gateway_requests_total counts them as 200), "
    "by endpoint and public model.",
    ["endpoint", "model"],
)

#: From the gateways registered with :func:`track_in_flight`.
_IN_FLIGHT = _Summed("gateway_in_flight_requests", "Requests being handled now.", "in_flight")
#: From the ledger writers registered with :func:`track_ledger`.
_LEDGER_BUFFERED = _Summed(
    "gateway_ledger_buffered_rows", "Usage rows waiting in memory for the ledger database.",
    "pending",
)  # fmt: skip
_SUMMED = (_IN_FLIGHT, _LEDGER_BUFFERED)
if not MULTIPROCESS:
    _COLLECTOR.families.extend(_SUMMED)
    REGISTRY.register(_COLLECTOR)


def flush() -> None:
    """Worker processes: move what this process counted since the last call into the files
    ``/metrics`` aggregates (every second, before a scrape, at shutdown; from the event loop,
    where requests update the numbers). Nothing to do in one process."""
    for family in _SHARED:
        family.flush()
    for gauge in _SUMMED:
        if gauge.shared is not None:
            gauge.shared.set(gauge.value())


class RequestSeries:
    """The series every request of one (endpoint, model, provider, status) updates: labelled
    once, updated in one call, in place (six calls to the children's ``inc``/``observe`` cost
    ~2k instructions more per request)."""

    __slots__ = ("completion", "latency", "overhead", "prompt", "requests", "upstream")

    def __init__(self, endpoint: str, model: str, provider: str, status: int) -> None:
        self.requests = REQUESTS.labels(endpoint, model, provider, str(status))
        self.latency = LATENCY.labels(endpoint, model)
        self.upstream = UPSTREAM_LATENCY.labels(model, provider)
        self.overhead = OVERHEAD.labels(endpoint)
        self.prompt = TOKENS.labels(model, "prompt")
        self.completion = TOKENS.labels(model, "completion")

    def record(
        self, total: float, upstream: float | None, overhead: float,
        prompt_tokens: int | None, completion_tokens: int,
    ) -> None:  # fmt: skip
        """One request: its latencies (``upstream`` None when no upstream was called) and its
        tokens (``prompt_tokens`` None when not counted)."""
        # _CounterChild.inc and _HistogramChild.observe, inline.
        self.requests.value += 1
        h = self.latency
        h.sum += total
        h.counts[bisect_left(h.bounds, total)] += 1
        if upstream is not None:
            h = self.upstream
            h.sum += upstream
            h.counts[bisect_left(h.bounds, upstream)] += 1
        h = self.overhead
        h.sum += overhead
        h.counts[bisect_left(h.bounds, overhead)] += 1
        if prompt_tokens is not None:
            if prompt_tokens > 0:
                self.prompt.value += prompt_tokens
            if completion_tokens > 0:
                self.completion.value += completion_tokens


#: The TTFT series of a model entry, by the entry's id.
_TTFT: dict[int, tuple[object, _HistogramChild]] = {}


def observe_ttft(ctx: Any, seconds: float) -> None:
    """A stream's time to first token, in the series of its model: the catalogue's name (an
    alias is the same model), or ``unknown`` (only configured names, whatever clients ask for).
    Looked up once per model entry, observed inline: ~1.5k instructions less per stream."""
    entry = ctx.model_entry
    hit = _TTFT.get(id(entry))
    if hit is None or hit[0] is not entry:
        if len(_TTFT) >= 4096:
            _TTFT.clear()
        label = entry.name if entry is not None else "unknown"
        hit = _TTFT[id(entry)] = (entry, TTFT.labels(label))
    h = hit[1]
    h.sum += seconds
    h.counts[bisect_left(h.bounds, seconds)] += 1


def track_in_flight(gateway: Any) -> None:
    """Count ``gateway.in_flight`` in ``gateway_in_flight_requests`` (held weakly, so a gateway
    that is gone stops counting)."""
    _IN_FLIGHT.sources.add(gateway)


def ledger_buffered() -> float:
    """``gateway_ledger_buffered_rows`` of this process, now (fault tests watch it)."""
    return _LEDGER_BUFFERED.value()


def track_ledger(writer: Any) -> None:
    """Count ``writer.pending`` (rows taken and not yet written or dropped) in
    ``gateway_ledger_buffered_rows`` (held weakly)."""
    _LEDGER_BUFFERED.sources.add(writer)


def render() -> tuple[bytes, str]:
    if MULTIPROCESS:
        from prometheus_client import multiprocess

        flush()  # (this worker's own numbers, as of now)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST
