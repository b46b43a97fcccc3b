"""The core's metrics in one process: plain numbers exposed by a collector, which must read
exactly as prometheus_client's own Counter and Histogram would."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from gateway import metrics
from gateway.metrics import _Family, _Summed


def _lines(registry: CollectorRegistry) -> list[str]:
    # _created holds creation times, which differ between any two series.
    return [ln for ln in generate_latest(registry).decode().splitlines() if "_created" not in ln]


def _exposition(collector: object) -> list[str]:
    registry = CollectorRegistry()
    registry.register(collector)  # type: ignore[arg-type]
    return _lines(registry)


def test_histogram_family_reads_as_prometheus_histogram() -> None:
    buckets = (0.001, 0.01, 0.1, 1.0)
    ours = _Family("t_seconds", "Doc.", ["endpoint", "model"], buckets)
    registry = CollectorRegistry()
    theirs = Histogram("t_seconds", "Doc.", ["endpoint", "model"], buckets=buckets,
                       registry=registry)  # fmt: skip
    # Bucket edges included (le is "<="), beyond the last bucket, zero and a second series.
    for labels, value in [(("chat", "a"), 0.001), (("chat", "a"), 0.0011), (("chat", "a"), 5.0),
                          (("chat", "a"), 0.0), (("embeddings", "b"), 0.1)]:  # fmt: skip
        ours.labels(*labels).observe(value)
        theirs.labels(*labels).observe(value)
    assert _exposition(_Single(ours)) == _lines(registry)


def test_counter_family_reads_as_prometheus_counter_and_ignores_negative_amounts() -> None:
    ours = _Family("c_total", "Doc.", ["model", "type"])
    registry = CollectorRegistry()
    theirs = Counter("c_total", "Doc.", ["model", "type"], registry=registry)
    for labels, amount in [(("m", "prompt"), 7), (("m", "prompt"), 1), (("m", "completion"), 0)]:
        ours.labels(*labels).inc(amount)
        theirs.labels(*labels).inc(amount)
    ours.labels("m", "prompt").inc(-5)  # an upstream's odd usage: no exception, no decrease
    assert _exposition(_Single(ours)) == _lines(registry)


def test_in_flight_gauge_sums_the_live_gateways() -> None:
    class Gw:
        in_flight = 0

    gauge = _Summed("gateway_in_flight_requests", "Requests being handled now.", "in_flight")
    a, b = Gw(), Gw()
    gauge.sources.add(a)
    gauge.sources.add(b)
    a.in_flight, b.in_flight = 2, 3
    assert "gateway_in_flight_requests 5.0" in _exposition(_Single(gauge))
    del b  # a gateway that is gone stops counting
    assert "gateway_in_flight_requests 2.0" in _exposition(_Single(gauge))


def test_ledger_buffered_rows_are_the_writers_rows_not_yet_written() -> None:
    from gateway.ledger.writer import LedgerWriter

    class Backend:
        def describe(self) -> str:
            return "fake"

    def buffered() -> float:
        text = _lines(metrics.REGISTRY)
        return float(next(ln for ln in text if ln.startswith("gateway_ledger_buffered_rows "))
                     .split()[-1])  # fmt: skip

    before = buffered()
    writer = LedgerWriter(Backend(), batch_size=100, flush_interval_s=60, max_buffer=3)  # type: ignore[arg-type]
    for _ in range(5):  # (two over the buffer: dropped, not buffered)
        writer.submit(object())  # type: ignore[arg-type]
    assert buffered() == before + 3
    writer.close(0)  # never started: what is left is lost
    assert buffered() == before


def test_a_counter_without_labels_is_exposed_as_0_before_its_first_use() -> None:
    family = _Family("gateway_test_fresh_total", "A fresh counter.", ())
    assert "gateway_test_fresh_total 0.0" in _exposition(_Single(family))
    family.inc()
    assert "gateway_test_fresh_total 1.0" in _exposition(_Single(family))


def test_core_metrics_are_exposed_by_the_default_registry() -> None:
    metrics.TOKENS.labels("metrics-test-model", "prompt").inc(3)
    text = metrics.render()[0].decode()
    assert 'gateway_tokens_total{model="metrics-test-model",type="prompt"} 3.0' in text
    assert "# TYPE gateway_request_duration_seconds histogram" in text
    assert "gateway_in_flight_requests" in text


class _Single:
    def __init__(self, family: object) -> None:
        self.family = family

    def collect(self) -> object:
        yield self.family.collect()  # type: ignore[attr-defined]


def test_request_series_records_as_the_separate_updates_would() -> None:
    """RequestSeries.record (one call per request) gives the children what their own inc and
    observe calls would."""
    series = metrics.RequestSeries("chat", "rs-test-a", "rs-provider", 200)
    series.record(0.02, 0.015, 0.005, 7, 3)
    series.record(0.5, None, 0.5, None, 0)  # no upstream call, no tokens counted
    series.record(0.001, 0.0, 0.001, -2, 0)  # odd usage: ignored, never a decrease
    expected = {
        "requests": (metrics.REQUESTS.labels("chat", "rs-test-a", "rs-provider", "200"), 3.0),
        "prompt": (metrics.TOKENS.labels("rs-test-a", "prompt"), 7.0),
        "completion": (metrics.TOKENS.labels("rs-test-a", "completion"), 3.0),
    }
    for child, value in expected.values():
        assert child.value == value
    separate = _Family("x_seconds", "Doc.", ["l"], metrics._LATENCY_BUCKETS).labels("v")
    for value in (0.02, 0.5, 0.001):
        separate.observe(value)
    latency = metrics.LATENCY.labels("chat", "rs-test-a")
    assert latency.counts == separate.counts and latency.sum == separate.sum
    upstream = metrics.UPSTREAM_LATENCY.labels("rs-test-a", "rs-provider")
    assert sum(upstream.counts) == 2 and upstream.sum == 0.015
    overhead = metrics.OVERHEAD.labels("chat")
    assert sum(overhead.counts) >= 3


def test_an_alias_counts_under_its_catalogue_model_in_every_series() -> None:
    """Tokens, requests and TTFT carry the catalogue's name, as the cost counter and the ledger
    do, so per-model series line up; the request log keeps the name asked for."""
    import httpx

    from tests.helpers import demo_model, running_gateway

    def config(url: str) -> dict[str, Any]:
        model = {**demo_model(url, name="metrics-alias-m"), "aliases": ["metrics-alias-a"]}
        return {"models": [model], "logging": {"request_log": "none"}}

    with running_gateway(config) as gw:
        records: list[dict[str, Any]] = []
        gw.gateway.observers.append(lambda ctx, record: records.append(record))
        client = gw.openai()
        msgs = [{"role": "user", "content": "hi"}]
        client.chat.completions.create(model="metrics-alias-a", messages=msgs)  # type: ignore[arg-type]
        list(client.chat.completions.create(model="metrics-alias-a", messages=msgs, stream=True))  # type: ignore[arg-type]
        text = httpx.get(f"{gw.url}/metrics").text
    assert 'model="metrics-alias-a"' not in text
    names = ("gateway_requests_total", "gateway_tokens_total", "gateway_cost_usd_total",
             "gateway_time_to_first_token_seconds_count")  # fmt: skip
    for name in names:
        lines = [ln for ln in text.splitlines() if ln.startswith(name + "{")]
        assert any('model="metrics-alias-m"' in ln for ln in lines), name
    assert [r["model"] for r in records] == ["metrics-alias-a", "metrics-alias-a"]
