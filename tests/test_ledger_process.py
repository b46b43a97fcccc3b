"""Real ``gateway serve`` processes: with several workers the cost metrics are aggregated across
them (Prometheus multiprocess mode) and agree with the ledger, and after SIGTERM the ledger holds
one row per request answered (flushed at shutdown)."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import demo_model, fake_upstream, spawn_gateway

TOKEN = "metrics-token-for-tests"
N = 12


def test_workers_metrics_and_ledger_agree_after_sigterm(tmp_path: Path) -> None:
    db = tmp_path / "usage.db"
    with fake_upstream() as fake:
        config = {
            "models": [demo_model(fake.url)],
            "logging": {"request_log": "none"},
            # a long interval: only the shutdown flush can write these rows
            "ledger": {"url": f"sqlite:///{db}", "flush_interval_s": 60},
            "metrics": {"bearer_token": TOKEN},
        }
        gw = spawn_gateway(config, workers=2)
        try:
            with httpx.Client(timeout=20) as client:
                for i in range(N):
                    body = {"model": "demo", "stream": i % 2 == 0,
                            "messages": [{"role": "user", "content": f"hello {i}"}]}  # fmt: skip
                    # a new connection each time, so both workers get requests
                    r = httpx.post(f"{gw.url}/v1/chat/completions", json=body, timeout=20)
                    assert r.status_code == 200
                # Each worker adds its counts to the shared files once a second (and the one
                # that answers the scrape, its own first): poll until both have.
                deadline = time.monotonic() + 10
                while True:
                    auth = {"authorization": f"Bearer {TOKEN}"}
                    text = client.get(f"{gw.url}/metrics", headers=auth).text
                    if _requests(text) == N or time.monotonic() > deadline:
                        break
                    time.sleep(0.2)
        finally:
            assert gw.stop() == 0, gw.output()[-2000:]
    samples = {
        s.name: s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name in ("gateway_cost_usd_total", "gateway_ledger_buffered_rows")
    }
    assert _requests(text) == N
    conn = sqlite3.connect(db)
    count, cost = conn.execute("SELECT count(*), sum(cost_usd) FROM gateway_usage").fetchone()
    conn.close()
    assert count == N
    assert samples["gateway_cost_usd_total"] == pytest.approx(cost, rel=1e-9)
    assert samples["gateway_ledger_buffered_rows"] == N  # nothing written before shutdown


def _requests(text: str) -> float:
    return sum(
        s.value for f in text_string_to_metric_families(text) for s in f.samples
        if s.name == "gateway_requests_total"
    )  # fmt: skip
