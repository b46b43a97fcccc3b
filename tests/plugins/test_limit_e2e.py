"""limit plugin end to end: through the real gateway with the openai SDK and raw HTTP, and
several gateway processes sharing one Redis."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import redis

from ..helpers import build_config, fake_upstream, running_gateway, spawn_gateway

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/14")
MSG = [{"role": "user", "content": "hello there"}]


def _limit(**config: object) -> list[dict[str, object]]:
    return [{"name": "limit", "config": config}]


def test_sdk_sees_rate_limit_headers_and_429() -> None:
    with running_gateway(pipeline=_limit(rules=[{"scope": "user", "rpm": 2, "tpm": 50_000}])) as gw:
        client = gw.openai()
        seen = []
        for _ in range(2):
            raw = client.chat.completions.with_raw_response.create(
                model="demo", messages=MSG, max_tokens=50
            )
            seen.append(raw.headers["x-ratelimit-remaining-requests"])
            assert raw.headers["x-ratelimit-limit-requests"] == "2"
            assert raw.headers["x-ratelimit-limit-tokens"] == "50000"
            assert raw.headers["x-ratelimit-reset-requests"].endswith("s")
            assert raw.parse().choices[0].message.content
        assert seen == ["1", "0"]
        with pytest.raises(openai.RateLimitError) as e:
            client.chat.completions.create(model="demo", messages=MSG, max_tokens=50)
        headers = e.value.response.headers
        assert 1 <= int(headers["retry-after"]) <= 60
        assert headers["x-ratelimit-remaining-requests"] == "0"
        assert headers["x-ratelimit-limit-requests"] == "2"
        assert e.value.code == "rate_limit_exceeded"
        assert len(gw.upstream_requests()) == 2  # the refused one never reached upstream


def test_streamed_usage_reconciles_the_token_reservation() -> None:
    with running_gateway(pipeline=_limit(rules=[{"scope": "user", "tpm": 10_000}])) as gw:
        client = gw.openai()
        raw = client.chat.completions.with_raw_response.create(
            model="demo", messages=MSG, max_tokens=3000, stream=True,
            stream_options={"include_usage": True},
        )  # fmt: skip
        first_remaining = int(raw.headers["x-ratelimit-remaining-tokens"])
        usage = [c.usage for c in raw.parse() if c.usage is not None][-1]
        assert first_remaining < 10_000 - 3000
        time.sleep(0.3)  # on_response of a stream runs just after its last byte
        raw2 = client.chat.completions.with_raw_response.create(
            model="demo", messages=MSG, max_tokens=3000
        )
        reservation = 10_000 - first_remaining
        remaining = int(raw2.headers["x-ratelimit-remaining-tokens"])
        # Only what the stream used stays counted; the rest of its reservation came back.
        assert remaining == 10_000 - usage.total_tokens - reservation


def test_budget_exceeded_is_insufficient_quota_for_the_sdk() -> None:
    rules = [{"scope": "tenant", "budget_usd": {"day": 0.000001}}]
    with running_gateway(pipeline=_limit(rules=rules)) as gw:
        client = gw.openai()
        client.chat.completions.create(model="demo", messages=MSG, max_tokens=20)
        with pytest.raises(openai.RateLimitError) as e:
            client.chat.completions.create(model="demo", messages=MSG, max_tokens=20)
        assert e.value.code == "insufficient_quota"
        assert int(e.value.response.headers["retry-after"]) >= 1


@pytest.fixture
def prefix() -> Iterator[str]:
    p = f"gwlimit-e2e-{uuid.uuid4().hex[:12]}"
    yield p
    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(match=f"{p}:*"))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.mark.slow
def test_two_gateway_processes_sharing_redis_admit_exactly_the_limit(prefix: str) -> None:
    limit = 10
    with fake_upstream() as fake:
        config = build_config(
            fake.url, pipeline=_limit(store=REDIS_URL, key_prefix=prefix,
                                      rules=[{"scope": "global", "rpm": limit}]),
        )  # fmt: skip
        procs = [spawn_gateway(config), spawn_gateway(config)]
        try:
            clients = [httpx.Client(base_url=p.url, timeout=20) for p in procs]
            body = {"model": "demo", "messages": MSG, "max_tokens": 5}

            def call(i: int) -> httpx.Response:
                return clients[i % 2].post("/v1/chat/completions", json=body)

            with ThreadPoolExecutor(16) as pool:
                responses = list(pool.map(call, range(5 * limit)))
            for c in clients:
                c.close()
            assert len(fake.requests()) == limit
        finally:
            for p in procs:
                p.stop()
    statuses = [r.status_code for r in responses]
    assert statuses.count(200) == limit
    assert statuses.count(429) == 4 * limit
    for r in responses:
        if r.status_code == 429:
            assert 1 <= int(r.headers["retry-after"]) <= 60
            assert r.json()["error"]["code"] == "rate_limit_exceeded"
