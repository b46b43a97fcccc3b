"""``gateway serve --workers 2``: /metrics adds up every worker's counts, not one worker's."""

from __future__ import annotations

import httpx

from tests.helpers import demo_model, fake_upstream, spawn_gateway


def test_metrics_are_aggregated_across_worker_processes() -> None:
    with fake_upstream() as fake:
        config = {
            "models": [demo_model(fake.url)],
            "metrics": {"bearer_token": "metrics-token"},
            "logging": {"request_log": "none"},
        }
        gw = spawn_gateway(config, workers=2)
        try:
            body = {"model": "demo", "messages": [{"role": "user", "content": "hi"}]}
            for _ in range(40):
                # a new connection each time, so the kernel spreads them over the workers
                r = httpx.post(f"{gw.url}/v1/chat/completions", json=body,
                               headers={"connection": "close"})  # fmt: skip
                assert r.status_code == 200
            assert httpx.get(f"{gw.url}/metrics").status_code == 401
            text = httpx.get(
                f"{gw.url}/metrics", headers={"authorization": "Bearer metrics-token"}
            ).text
            line = next(
                ln
                for ln in text.splitlines()
                if ln.startswith('gateway_requests_total{endpoint="chat",model="demo"')
            )
            assert float(line.split()[-1]) == 40.0
        finally:
            assert gw.stop() == 0
