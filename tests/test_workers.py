"""``gateway serve --workers 2``: /metrics adds up every worker's counts, not one worker's."""

from __future__ import annotations

import json

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


RULE = {"scope": "user", "rpm": 60}


def test_several_workers_with_memory_stores_warn_at_startup() -> None:
    from gateway.cli import per_process_stores
    from gateway.config import parse_settings
    from gateway.pipeline import build_pipeline

    def stores(limit_store: str) -> list[str]:
        raw = {
            "models": [demo_model("http://127.0.0.1:9/v1")],
            "pipeline": [
                {"name": "limit", "config": {"store": limit_store, "rules": [RULE]}},
                {"name": "cache", "config": {}},
                {"name": "headers", "config": {}},
            ],
        }
        return per_process_stores(build_pipeline(parse_settings(raw, "cfg.yaml", {})))

    assert stores("memory") == ["limit", "cache"]
    assert stores("redis://127.0.0.1:6379/0") == ["cache"]

    with fake_upstream() as fake:
        config = {
            "models": [demo_model(fake.url)],
            "logging": {"request_log": "none"},
            "pipeline": [{"name": "limit", "config": {"rules": [RULE]}}],
        }
        gw = spawn_gateway(config, workers=2)
        try:
            warning = next(
                json.loads(line)
                for line in gw.log_path.read_text().splitlines()
                if '"per_worker_state"' in line
            )
            assert warning["level"] == "warning" and warning["plugins"] == ["limit"]
            assert warning["workers"] == 2
        finally:
            assert gw.stop() == 0
        single = spawn_gateway(config, workers=1)
        try:
            assert "per_worker_state" not in single.log_path.read_text()
        finally:
            assert single.stop() == 0
