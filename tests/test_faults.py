"""Fault injection under load: Redis stopped and restarted, the ledger's PostgreSQL unreachable,
an upstream flapping between 200, 503 and hangs. Each test states its expectation and prints
what it measured (``pytest -s``). The scenarios live in bench/faults.py; ``python -m
bench.faults`` runs longer versions."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from bench.faults import flapping, postgres_outage, redis_outage

from .plugins.test_limit_redis import OwnRedis


@pytest.fixture
def own_redis() -> Iterator[OwnRedis]:
    server = OwnRedis()
    server.start()
    try:
        yield server
    finally:
        if server.proc is not None and server.proc.poll() is None:
            server.kill()


@pytest.mark.slow
def test_redis_stopped_and_restarted_mid_load(own_redis: OwnRedis) -> None:
    """Expectation: limit (fail_open) and cache (a miss) keep serving while Redis is down: 0
    client errors, no request slower than 2 s (a dead Redis costs at most a socket timeout,
    never a hang); after the restart Redis is used again (new keys appear)."""
    result = redis_outage(own_redis, seconds=4.0, down_at=1.0, down_s=1.5)
    print(f"\n[faults] {result}")
    assert result["requests"] >= 20
    assert result["errors"] == 0
    assert result["max_ms"] < 2000
    assert result["keys_after_restart"] > 0


@pytest.mark.slow
def test_upstream_flapping_with_two_deployments_clients_see_no_errors() -> None:
    """Expectation: deployment A flaps every 150 ms between healthy, 503 and hanging; B stays
    healthy. With the route plugin (failover, breaker) clients see 0 errors (half of the
    requests streamed); a hang costs at most the 0.5 s read timeout before failover."""
    result = flapping(seconds=4.0)
    print(f"\n[faults] {result}")
    assert result["requests"] >= 20
    assert result["errors"] == 0
    assert result["max_ms"] < 2000


@pytest.mark.slow
def test_postgres_unreachable_mid_load_ledger_buffers_and_catches_up() -> None:
    """Expectation: with the ledger's PostgreSQL cut for 1.5 s mid-load, clients see 0 errors
    and no request slower than 1 s (the ledger is off the request path); rows wait in memory
    and all reach the database after it returns: rows == requests, 0 dropped."""
    result = postgres_outage(seconds=4.0, down_at=1.0, down_s=1.5)
    print(f"\n[faults] {result}")
    assert result["requests"] >= 20
    assert result["errors"] == 0
    assert result["max_ms"] < 1000
    assert result["max_buffered"] > 0  # the outage was real: rows were held back
    assert result["rows_when_restored"] < result["requests"]
    assert result["rows"] == result["requests"]
    assert result["dropped"] == 0
