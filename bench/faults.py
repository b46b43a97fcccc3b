"""Fault scenarios under load (longer versions of tests/test_faults.py, which calls these with
short durations).

    python -m bench.faults redis --seconds 30 --down 10    # Redis killed, restarted mid-load
    python -m bench.faults flap --seconds 30               # deployment A flaps 200/503/hang
    python -m bench.faults postgres --seconds 30 --down 10 # ledger database unreachable

Each prints one JSON line: requests, errors (by kind), p50/p99/max latency (ms). Loopback only:
the fake upstream, the real gateway (in-process uvicorn) and, for ``redis``, a redis-server of
its own on a free port (never the shared one on 6379); for ``postgres``, the PostgreSQL server
on 127.0.0.1:5432 (or ``DATABASE_URL``) reached through a TCP switch the scenario cuts.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import threading
import time
import uuid
from collections import Counter
from typing import Any

import httpx

from gateway import metrics as core_metrics
from gateway.fake_upstream.state import STATE
from gateway.ledger import metrics as ledger_metrics
from gateway.ledger.postgres import PostgresBackend
from tests.helpers import demo_model, running_gateway
from tests.plugins.test_limit_redis import OwnRedis
from tests.test_ledger_postgres import Switch, via

DATABASE_URL = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")


def load(url: str, seconds: float, body: Any, workers: int = 4) -> tuple[list[Any], list[float]]:
    """``workers`` threads posting ``body()`` for ``seconds``; returns statuses and latencies."""
    statuses: list[Any] = []
    latencies: list[float] = []
    end = time.monotonic() + seconds

    def run() -> None:
        with httpx.Client(base_url=url, timeout=15) as c:
            while time.monotonic() < end:
                t = time.perf_counter()
                try:
                    r = c.post("/v1/chat/completions", json=body())
                    statuses.append(r.status_code)
                except httpx.HTTPError as e:
                    statuses.append(type(e).__name__)
                latencies.append(time.perf_counter() - t)

    threads = [threading.Thread(target=run) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 30)
    return statuses, latencies


def summary(name: str, statuses: list[Any], latencies: list[float], **extra: Any) -> dict[str, Any]:
    lat = sorted(latencies) or [0.0]
    return {
        "scenario": name,
        "requests": len(statuses),
        "errors": sum(1 for s in statuses if s != 200),
        "error_kinds": dict(Counter(str(s) for s in statuses if s != 200)),
        "p50_ms": round(lat[len(lat) // 2] * 1000, 1),
        "p99_ms": round(lat[max(0, int(len(lat) * 0.99) - 1)] * 1000, 1),
        "max_ms": round(lat[-1] * 1000, 1),
        **extra,
    }


def redis_outage(server: OwnRedis, seconds: float, down_at: float, down_s: float) -> dict[str, Any]:
    """limit (fail_open) and cache on ``server``; it is killed at ``down_at`` for ``down_s``."""
    pipeline = [
        {"name": "limit", "config": {"store": server.url, "on_store_error": "fail_open",
                                     "retry_store_after_s": 0.2,
                                     "rules": [{"scope": "global", "rpm": 10_000_000}]}},
        {"name": "cache", "config": {"store": server.url, "retry_store_after_s": 0.2}},
    ]  # fmt: skip

    def body() -> dict[str, Any]:
        if random.random() < 0.5:  # half from a small deterministic set: cache hits
            msg = {"role": "user", "content": f"q{random.randint(0, 9)}"}
            return {"model": "demo", "temperature": 0, "messages": [msg]}
        return {"model": "demo", "messages": [{"role": "user", "content": uuid.uuid4().hex}]}

    outcome: dict[str, Any] = {}
    with running_gateway(pipeline=pipeline) as gw:

        def chaos() -> None:
            import redis

            time.sleep(down_at)
            server.kill()
            time.sleep(down_s)
            server.start()  # same port, empty
            time.sleep(min(1.0, max(0.2, seconds - down_at - down_s - 0.5)))
            client = redis.Redis(port=server.port)
            outcome["keys_after_restart"] = len(client.keys("*"))
            client.close()

        t = threading.Thread(target=chaos)
        t.start()
        statuses, latencies = load(gw.url, seconds, body)
        t.join(30)
    return summary("redis_outage", statuses, latencies, down_s=down_s, **outcome)


def flapping(seconds: float, period_s: float = 0.15) -> dict[str, Any]:
    """Deployment A flaps between healthy, 503 and hanging; B is healthy; route plugin on."""

    def config(upstream: str) -> dict[str, Any]:
        model = demo_model(upstream, "demo", model="flap-a")
        model["deployments"].append({**model["deployments"][0], "model": "steady-b"})
        return {
            "models": [model],
            "upstream": {
                "read_timeout_s": 0.5,
                "first_byte_timeout_s": 0.5,
                "response_timeout_s": 0.5,  # (plain requests hang too)
            },
            "pipeline": [{"name": "route", "config": {"deadline_s": 10}}],
            "logging": {"request_log": "none"},
        }

    with running_gateway(config, fake={"record": 0}) as gw:
        behaviours = gw.upstream.runner.app[STATE].behaviours
        states: list[dict[str, Any]] = [{}, {"status": 503}, {"hang_ms": 3000.0}]
        stop = threading.Event()

        def flap() -> None:
            while not stop.is_set():
                behaviours["flap-a"] = random.choice(states)
                time.sleep(period_s)

        flapper = threading.Thread(target=flap)
        flapper.start()

        def body() -> dict[str, Any]:
            stream = random.random() < 0.5
            return {"model": "demo", "messages": [{"role": "user", "content": "hi"}],
                    "stream": stream}  # fmt: skip

        try:
            statuses, latencies = load(gw.url, seconds, body)
        finally:
            stop.set()
            flapper.join(5)
    return summary("flapping", statuses, latencies, period_s=period_s)


def postgres_outage(seconds: float, down_at: float, down_s: float) -> dict[str, Any]:
    """The gateway's ledger on PostgreSQL through a switch that is cut at ``down_at`` for
    ``down_s`` (connections reset, new ones refused). Requests must keep succeeding; rows wait
    in memory and reach the database after it comes back: ``rows == requests``, none dropped."""
    from urllib.parse import urlsplit

    target = urlsplit(DATABASE_URL)
    switch = Switch((target.hostname or "127.0.0.1", target.port or 5432))
    prefix = f"fault{secrets.token_hex(4)}_"
    ledger = {"url": via(switch.port, DATABASE_URL), "table_prefix": prefix,
              "flush_interval_s": 0.2}  # fmt: skip
    backend = PostgresBackend(DATABASE_URL, prefix)
    dropped = ledger_metrics.LEDGER_DROPPED.labels("buffer_full")._value.get()
    outcome: dict[str, Any] = {"max_buffered": 0}
    try:
        with running_gateway(ledger=ledger) as gw:

            def chaos() -> None:
                time.sleep(down_at)
                switch.cut()
                end = time.monotonic() + down_s
                while time.monotonic() < end:
                    outcome["max_buffered"] = max(
                        outcome["max_buffered"], int(core_metrics.ledger_buffered())
                    )
                    time.sleep(0.05)
                outcome["rows_when_restored"] = backend.count()
                switch.up = True

            t = threading.Thread(target=chaos)
            t.start()
            body = {"model": "demo", "messages": [{"role": "user", "content": "hello"}]}
            statuses, latencies = load(gw.url, seconds, lambda: body)
            t.join(30)
            started = time.monotonic()
            while backend.count() < len(statuses) and time.monotonic() - started < 30:
                time.sleep(0.1)
            outcome["catch_up_s"] = round(time.monotonic() - started, 2)
        outcome["rows"] = backend.count()  # after the gateway's shutdown flush
        now_dropped = ledger_metrics.LEDGER_DROPPED.labels("buffer_full")._value.get()
        outcome["dropped"] = now_dropped - dropped
    finally:
        switch.close()
        backend.drop()
    return summary("postgres_outage", statuses, latencies, down_s=down_s, **outcome)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("scenario", choices=["redis", "flap", "postgres"])
    p.add_argument("--seconds", type=float, default=30)
    p.add_argument("--down", type=float, default=10,
                   help="redis, postgres: seconds the server stays down")  # fmt: skip
    args = p.parse_args(argv)
    if args.scenario == "redis":
        server = OwnRedis()
        server.start()
        try:
            result = redis_outage(server, args.seconds, args.seconds / 4, args.down)
        finally:
            if server.proc is not None and server.proc.poll() is None:
                server.kill()
    elif args.scenario == "postgres":
        result = postgres_outage(args.seconds, args.seconds / 4, args.down)
    else:
        result = flapping(args.seconds)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
