"""Worker processes (``--workers``): the core's plain-number series are moved into
prometheus_client's multiprocess files by ``metrics.flush``, and ``/metrics`` aggregated from
those files must read exactly as the same updates made through prometheus_client's own metrics
(what workers did before, one file write per update)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gateway import metrics

SCRIPT = r"""
import json, sys
from prometheus_client import CollectorRegistry, Counter, Histogram, Gauge, generate_latest
from prometheus_client import multiprocess

mode = sys.argv[1]
if mode == "ours":
    from gateway import metrics
UPDATES = [
    # (endpoint, model, provider, status, total, upstream, overhead, prompt, completion)
    ("chat", "a", "openai", 200, 0.0005, 0.0004, 0.0001, 10, 5),
    ("chat", "a", "openai", 200, 0.3, 0.29, 0.01, 1000, 0),
    ("chat", "a", "openai", 200, 200.0, None, 0.0, None, 0),
    ("embeddings", "b", "openai", 502, 0.0011, 0.001, 0.0001, 3, 0),
]
TTFT = [("a", 0.001), ("a", 0.7), ("b", 999.0)]


class Gw:
    in_flight = 3


gw = Gw()


def ours(batch):
    for e, m, p, s, total, up, over, pt, ct in batch:
        metrics.RequestSeries(e, m, p, s).record(total, up, over, pt, ct)


def theirs(batch):
    # What workers did before: prometheus_client's metrics, updated one by one.
    for e, m, p, s, total, up, over, pt, ct in batch:
        REQ.labels(e, m, p, str(s)).inc()
        LAT.labels(e, m).observe(total)
        if up is not None:
            UPS.labels(m, p).observe(up)
        OVER.labels(e).observe(over)
        if pt is not None:
            TOK.labels(m, "prompt").inc(pt)
            TOK.labels(m, "completion").inc(ct)
    DISC.inc()


if mode == "ours":
    metrics.track_in_flight(gw)
    ours(UPDATES[:2])
    metrics.DISCONNECTS.inc()
    for m, v in TTFT[:2]:
        metrics.TTFT.labels(m).observe(v)
    metrics.flush()
    metrics.flush()  # nothing new: nothing added twice
    ours(UPDATES[2:])
    metrics.TTFT.labels("b").observe(999.0)
    gw.in_flight = 1
    metrics.flush()
else:
    ns = ""  # (gateway.metrics not imported: its metrics would write files of their own)
    b, ob = json.loads(sys.argv[2])
    REQ = Counter(ns + "gateway_requests_total", "d", ["endpoint", "model", "provider", "status"])
    LAT = Histogram(ns + "gateway_request_duration_seconds", "d", ["endpoint", "model"], buckets=b)
    UPS = Histogram(ns + "gateway_upstream_duration_seconds", "d", ["model", "provider"], buckets=b)
    TT = Histogram(ns + "gateway_time_to_first_token_seconds", "d", ["model"], buckets=b)
    OVER = Histogram(ns + "gateway_overhead_seconds", "d", ["endpoint"],
                     buckets=ob)
    TOK = Counter(ns + "gateway_tokens_total", "d", ["model", "type"])
    DISC = Counter(ns + "gateway_client_disconnects_total", "d")
    INF = Gauge(ns + "gateway_in_flight_requests", "d", multiprocess_mode="livesum")
    theirs(UPDATES)
    for m, v in TTFT:
        TT.labels(m).observe(v)
    INF.set(1)

registry = CollectorRegistry()
multiprocess.MultiProcessCollector(registry)
print(generate_latest(registry).decode())
"""


def _exposition(tmp: Path, mode: str) -> list[str]:
    folder = tmp / mode
    folder.mkdir()
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            SCRIPT,
            mode,
            json.dumps([metrics._LATENCY_BUCKETS, metrics._OVERHEAD_BUCKETS]),
        ],
        env={"PROMETHEUS_MULTIPROC_DIR": str(folder), "PATH": "/usr/bin:/bin"},
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    keep = ("gateway_requests", "gateway_request_duration", "gateway_upstream_duration",
            "gateway_time_to_first", "gateway_overhead", "gateway_tokens",
            "gateway_client_disconnects", "gateway_in_flight")  # fmt: skip
    return sorted(ln for ln in out.splitlines() if ln.startswith(keep))


def test_flushed_worker_series_read_as_prometheus_clients_own(tmp_path: Path) -> None:
    ours, theirs = _exposition(tmp_path, "ours"), _exposition(tmp_path, "theirs")
    assert len(ours) > 100  # every bucket of every series
    assert ours == theirs
    assert (
        'gateway_requests_total{endpoint="chat",model="a",provider="openai",status="200"} 3.0'
        in ours
    )
    assert "gateway_in_flight_requests 1.0" in ours


@pytest.mark.anyio
async def test_a_failing_metrics_flush_does_not_stop_the_request_log_flushes(
    monkeypatch: Any,
) -> None:
    import asyncio

    from gateway import state
    from gateway.config import parse_settings
    from gateway.state import Gateway

    model = {
        "name": "m",
        "deployments": [{"provider": "openai", "model": "m", "base_url": "http://127.0.0.1:9/v1"}],
    }
    gw = Gateway(parse_settings({"models": [model], "logging": {"request_log": "none"}}))
    calls = {"log": 0, "metrics": 0}

    def fail() -> None:
        calls["metrics"] += 1
        raise OSError("disk full")

    def log_flush() -> None:
        calls["log"] += 1

    real_sleep = asyncio.sleep
    monkeypatch.setattr(state.metrics, "flush", fail)
    monkeypatch.setattr(gw.request_log, "flush", log_flush)
    monkeypatch.setattr(state.asyncio, "sleep", lambda s: real_sleep(0))
    task = asyncio.create_task(gw._flush_logs())
    for _ in range(100):
        await real_sleep(0)
    assert not task.done()  # (a failed flush used to end the task, and the log's flushes)
    task.cancel()
    assert calls["log"] >= 3 and calls["metrics"] >= 3
