"""``gateway serve --workers 2``: /metrics adds up every worker's counts, not one worker's."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

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

            def requests() -> float:
                text = httpx.get(
                    f"{gw.url}/metrics", headers={"authorization": "Bearer metrics-token"}
                ).text
                line = next(
                    ln
                    for ln in text.splitlines()
                    if ln.startswith('gateway_requests_total{endpoint="chat",model="demo"')
                )
                return float(line.split()[-1])

            # Each worker adds its counts to the shared files once a second (and the one that
            # answers the scrape, its own first).
            deadline = time.monotonic() + 10
            while requests() != 40.0 and time.monotonic() < deadline:
                time.sleep(0.2)
            assert requests() == 40.0
            # ... and no more: what was added is not added again.
            time.sleep(2.5)
            assert requests() == 40.0
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


def worker_pids(parent: int) -> list[int]:
    """The uvicorn worker processes of the gateway process ``parent`` (not its helpers)."""
    children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    out = []
    for pid in map(int, children):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except FileNotFoundError:
            continue
        if b"spawn_main" in cmdline:
            out.append(pid)
    return out


def test_sigterm_with_workers_drains_like_one_worker_then_refuses_new_connections() -> None:
    """Every worker answers /readyz 503 for drain_delay_s while still serving, the stream in
    flight finishes, and once the workers stopped accepting a new connection is refused at
    once (it used to wait in the listen queue of the socket the supervisor still held)."""
    with fake_upstream(chunks=20, delay_ms=300) as fake:  # a 6 s answer
        config = {
            "models": [demo_model(fake.url)],
            "server": {"drain_delay_s": 2.0, "drain_timeout_s": 15},
            "logging": {"request_log": "none"},
        }
        gw = spawn_gateway(config, workers=2)
        result: dict[str, Any] = {}

        def stream() -> None:
            body = {"model": "demo", "stream": True, "messages": [{"role": "user", "content": "a"}]}
            r = httpx.post(f"{gw.url}/v1/chat/completions", json=body, timeout=30)
            result.update(status=r.status_code, text=r.text)

        def ready() -> int:
            r = httpx.get(f"{gw.url}/readyz", headers={"connection": "close"}, timeout=5)
            return r.status_code

        t = threading.Thread(target=stream)
        try:
            t.start()
            time.sleep(0.5)
            gw.proc.send_signal(signal.SIGTERM)
            # The supervisor looks at its signals every 0.5 s, then tells every worker at once.
            deadline = time.monotonic() + 1.5
            while ready() != 503 and time.monotonic() < deadline:
                time.sleep(0.05)
            draining_since = time.monotonic()
            statuses = [ready() for _ in range(4)]  # new connections: whichever worker takes it
            assert statuses == [503] * 4, statuses
            time.sleep(max(0.0, draining_since + 2.3 - time.monotonic()))  # past the delay
            assert t.is_alive()  # the stream is still running
            started = time.monotonic()
            with pytest.raises(httpx.ConnectError):
                httpx.get(f"{gw.url}/healthz", timeout=5)
            assert time.monotonic() - started < 1.0
            t.join(30)
            assert gw.proc.wait(30) == 0, gw.output()[-2000:]
            assert result["status"] == 200 and result["text"].endswith("data: [DONE]\n\n")
        finally:
            if gw.proc.poll() is None:
                gw.proc.kill()
                gw.proc.wait(10)
            t.join(30)


def test_a_killed_worker_leaves_the_in_flight_gauge() -> None:
    """A worker killed with a request in flight is restarted, and its share of the live gauge
    (the prometheus multiprocess file of a dead pid) leaves the sum."""
    with fake_upstream(chunks=50, delay_ms=200) as fake:  # a 10 s answer
        config = {
            "models": [demo_model(fake.url)],
            "metrics": {"bearer_token": "metrics-token"},
            "logging": {"request_log": "none"},
        }
        gw = spawn_gateway(config, workers=2)
        auth = {"authorization": "Bearer metrics-token", "connection": "close"}

        def in_flight() -> float:
            text = httpx.get(f"{gw.url}/metrics", headers=auth, timeout=5).text
            line = next(
                ln for ln in text.splitlines() if ln.startswith("gateway_in_flight_requests ")
            )
            return float(line.split()[-1])

        try:
            body = {"model": "demo", "stream": True, "messages": [{"role": "user", "content": "a"}]}

            def stream() -> None:
                with contextlib.suppress(httpx.HTTPError):  # its worker is killed midway
                    httpx.post(f"{gw.url}/v1/chat/completions", json=body, timeout=20)

            t = threading.Thread(target=stream, daemon=True)
            t.start()
            deadline = time.monotonic() + 5
            while in_flight() != 1.0 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert in_flight() == 1.0
            old = worker_pids(gw.proc.pid)
            assert len(old) == 2
            for pid in old:
                os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                now = worker_pids(gw.proc.pid)
                if len(now) == 2 and not set(now) & set(old):
                    try:
                        if httpx.get(f"{gw.url}/readyz", timeout=1).status_code == 200:
                            break
                    except httpx.HTTPError:
                        pass
                time.sleep(0.2)
            assert in_flight() == 0.0
        finally:
            assert gw.stop() == 0
