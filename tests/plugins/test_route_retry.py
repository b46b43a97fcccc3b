"""The route plugin's Retry-After handling against its breakers (unit tests)."""

from __future__ import annotations

import asyncio
import time

import pytest

from plugins.route import RoutePlugin
from plugins.route.breaker import HALF_OPEN
from plugins.route.config import RouteConfig
from tests.plugins.test_route import catalogue, ctx, ids, plugin, retryable

ONLY_BIG = [{"deployments": ["big"], "fallbacks": False}]


@pytest.mark.anyio
async def test_no_wait_when_the_breaker_stays_open_longer_and_the_client_is_told() -> None:
    """The 429 asks for 1 s, but it was the failure that opened the breaker for 30 s: no
    retry after 1 s (the breaker would not allow it), and the client's Retry-After says 30."""
    p = plugin(breaker={"failures": 1, "cooldown_s": 30}, max_retry_wait_s=2, rules=ONLY_BIG)
    c = ctx()
    await p.on_request(c)
    assert ids(c) == ["big"]
    err = retryable(429, **{"retry-after": "1"})
    started = time.perf_counter()
    await p.on_attempt(c, c.candidates.pop(0), err, 0.01)
    assert time.perf_counter() - started < 0.5
    assert c.candidates == []
    assert err.headers["retry-after"] == "30"


@pytest.mark.anyio
async def test_a_longer_upstream_retry_after_is_kept() -> None:
    p = plugin(breaker={"failures": 1, "cooldown_s": 5}, rules=ONLY_BIG)
    c = ctx()
    await p.on_request(c)
    err = retryable(503, **{"retry-after": "60"})
    await p.on_attempt(c, c.candidates.pop(0), err, 0.01)
    assert err.headers["retry-after"] == "60"


@pytest.mark.anyio
async def test_a_short_retry_after_is_waited_until_the_breaker_lets_the_retry_through() -> None:
    p = RoutePlugin(RouteConfig.model_validate({"max_retry_wait_s": 1, "rules": ONLY_BIG}), seed=1)
    p.bind(catalogue())
    c = ctx()
    await p.on_request(c)
    started = time.perf_counter()
    await p.on_attempt(c, c.candidates.pop(0), retryable(429, **{"retry-after": "0.3"}), 0.01)
    assert time.perf_counter() - started >= 0.3
    assert ids(c) == ["big"]
    assert p.breakers.state("big") == HALF_OPEN  # the retry is the probe, held by this request
    assert c.scratch_for("route")["claims"] == ["big"]


@pytest.mark.anyio
async def test_the_circuit_gauge_turns_half_open_when_the_cool_down_ends() -> None:
    """Without anything asking the breaker (no request, no /readyz) the scraped gauge says
    half-open once the cool-down has passed, not open."""
    from prometheus_client import REGISTRY

    from plugins.route.breaker import Breakers

    def gauge() -> float | None:
        return REGISTRY.get_sample_value("gateway_circuit_state", {"deployment": "gauge-dep"})

    breakers = Breakers(1, 0.05)
    breakers.add("gauge-dep")
    breakers.failure("gauge-dep")
    assert gauge() == 1.0
    await asyncio.sleep(0.15)
    assert gauge() == 2.0
