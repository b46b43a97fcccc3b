"""cache plugin: config, keys, stores (memory and real Redis), hooks, and end to end through the
real gateway (SDK, plain and streamed, tenants, zero cost on hits, limits)."""

from __future__ import annotations

import asyncio
import itertools
import os
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import orjson
import pytest
import redis as syncredis
from pydantic import ValidationError

from gateway.config import ConfigError
from gateway.context import Identity, RequestContext, Usage
from plugins.cache import CacheConfig, CachePlugin
from plugins.cache.config import DEFAULT_IGNORED_HEADERS
from plugins.cache.keys import HeaderFilter, deterministic, request_key
from plugins.cache.store import MemoryStore, RedisStore

from ..helpers import free_port, running_gateway
from .test_auth_support import USER_KEY, base_config, key_entry

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/13")
MSG = [{"role": "user", "content": "what is two plus two"}]
_ids = itertools.count()


def make_ctx(
    tenant: str | None = "acme",
    stream: bool = False,
    headers: list[tuple[str, str]] | None = None,
    **body: Any,
) -> RequestContext:
    data: dict[str, Any] = {"model": "demo", "messages": MSG, "temperature": 0}
    data.update(body)
    pairs = headers or []
    ctx = RequestContext(
        request_id=f"r{next(_ids)}", endpoint="chat", path="/v1/chat/completions",
        method="POST", headers=dict(pairs), raw_headers=pairs, body=data, model="demo",
        stream=stream,
    )  # fmt: skip
    if tenant is not None:
        ctx.identity = Identity(user="u", tenant=tenant)
    return ctx


async def started(**config: Any) -> CachePlugin:
    plugin = CachePlugin(CacheConfig.model_validate(config))
    await plugin.startup(None)
    return plugin


async def miss_then_store(plugin: CachePlugin, ctx: RequestContext, content: str) -> None:
    assert await plugin.on_request(ctx) is None
    ctx.status = 200
    ctx.response = {"id": "x", "choices": [{"message": {"content": content}}]}
    ctx.usage = Usage(7, 3)
    await plugin.on_response(ctx)


# --- config and keys ----------------------------------------------------------------------------


def test_config_rejects_unknown_keys_bad_store_and_ttl() -> None:
    with pytest.raises(ValidationError, match="ttl"):
        CacheConfig.model_validate({"ttl": 5})
    with pytest.raises(ValidationError, match="store must be 'memory' or a redis"):
        CacheConfig.model_validate({"store": "memcached://x"})
    with pytest.raises(ValidationError, match="greater than 0"):
        CacheConfig.model_validate({"ttl_s": 0})
    with pytest.raises(ValidationError, match="less than or equal to 1"):
        CacheConfig.model_validate({"semantic": {"threshold": 1.5}})
    assert CacheConfig().semantic.enabled is False


def test_only_deterministic_requests_are_cacheable() -> None:
    assert deterministic({"temperature": 0})
    assert deterministic({"temperature": 0.0})
    assert deterministic({"seed": 42, "temperature": 0.9})
    assert not deterministic({})
    assert not deterministic({"temperature": 0.2})
    assert not deterministic({"seed": True, "temperature": False})
    assert not deterministic({"seed": "42"})


def test_key_is_canonical_and_separates_tenant_model_stream_and_params() -> None:
    a = {"messages": MSG, "temperature": 0, "max_tokens": 5}
    b = {"max_tokens": 5, "temperature": 0, "messages": MSG}
    base = request_key("acme", "demo", a, False)
    assert request_key("acme", "demo", b, False) == base  # key order does not matter
    assert request_key("acme", "demo", {**a, "user": "bob"}, False) == base
    assert request_key("other", "demo", a, False) != base
    assert request_key("acme", "demo2", a, False) != base
    assert request_key("acme", "demo", a, True) != base
    assert request_key("acme", "demo", {**a, "max_tokens": 6}, False) != base
    assert request_key("acme", "demo", {**a, "tools": []}, False) != base
    # A tenant name cannot be crafted to collide with another tenant + model split.
    assert request_key("a", "cme:demo", a, False) != request_key("a:cme", "demo", a, False)
    # Forwarded headers: none keeps the key entries stored before headers counted had.
    assert request_key("acme", "demo", a, False, []) == base
    assert request_key("acme", "demo", a, False, [("openai-beta", "x=1")]) != base


def test_key_headers_keep_what_an_upstream_may_act_on_and_ignore_the_rest() -> None:
    f = HeaderFilter(CacheConfig().ignore_headers)
    forwarded = [
        ("x-vendor-mode", "b"), ("user-agent", "curl/8"), ("traceparent", "00-ab-cd-01"),
        ("x-stainless-retry-count", "1"), ("openai-beta", "assistants=v2"),
        ("x-datadog-trace-id", "9"), ("x-vendor-mode", "a"), ("sec-fetch-mode", "cors"),
        # Per-request headers of CDNs, APM agents and meshes in front of the gateway.
        ("cf-ray", "8a1b2c3d4e5f-CDG"), ("newrelic", "eyJ2Ijpb"), ("x-request-start", "t=17"),
        ("elastic-apm-traceparent", "00-1-2-01"), ("x-envoy-attempt-count", "1"),
    ]  # fmt: skip
    assert f.key_headers(forwarded) == [
        ("openai-beta", "assistants=v2"), ("x-vendor-mode", "a"), ("x-vendor-mode", "b"),
    ]  # fmt: skip
    assert f.key_headers([]) == []
    # The operator's list replaces the defaults; names are lower-cased, prefixes end in "*".
    cfg = CacheConfig.model_validate({"ignore_headers": ["X-Vendor-*"]})
    assert cfg.ignore_headers == ("x-vendor-*",)
    assert HeaderFilter(cfg.ignore_headers).key_headers(forwarded[:2]) == [("user-agent", "curl/8")]
    assert "user-agent" in DEFAULT_IGNORED_HEADERS
    for bad in ("", "*", "x y", "a:b"):
        with pytest.raises(ValidationError, match="is not a header name"):
            CacheConfig.model_validate({"ignore_headers": [bad]})


# --- stores -------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_memory_store_ttl_lru_and_byte_bound() -> None:
    now = [0.0]
    store = MemoryStore(max_entries=2, max_bytes=10, clock=lambda: now[0])
    await store.set("a", b"1111", 5)
    await store.set("b", b"2222", 5)
    assert await store.get("a") == b"1111"  # a is now the most recent
    await store.set("c", b"33", 5)  # over 2 entries: b (least recent) goes
    assert await store.get("b") is None
    assert await store.get("a") == b"1111" and await store.get("c") == b"33"
    await store.set("d", b"4444444", 5)  # over 10 bytes: evicts until it fits
    assert store.bytes <= 10 and await store.get("d") == b"4444444"
    await store.set("huge", b"x" * 11, 5)  # larger than the whole store: not kept
    assert await store.get("huge") is None
    now[0] = 5.0
    assert await store.get("d") is None and await store.get("c") is None


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    p = f"gwcache-test-{uuid.uuid4().hex[:12]}"
    yield p
    client = syncredis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(match=f"{p}:*"))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.mark.anyio
async def test_redis_store_round_trip_with_ttl(prefix: str) -> None:
    store = RedisStore(REDIS_URL, prefix, 0.25, 1.0)
    await store.set("k", b"value", 0.3)
    assert await store.get("k") == b"value"
    ttl = syncredis.Redis.from_url(REDIS_URL).pttl(f"{prefix}:k")
    assert 0 < ttl <= 300
    await asyncio.sleep(0.4)
    assert await store.get("k") is None
    await store.close()


@pytest.mark.anyio
async def test_redis_down_is_a_miss_and_is_skipped_for_a_while() -> None:
    store = RedisStore(f"redis://127.0.0.1:{free_port()}/0", "p", 0.2, 30.0)
    assert await store.get("k") is None  # connection refused: a miss, not an error
    await store.set("k", b"v", 5)  # skipped silently
    assert store._skip_until > 0
    await store.close()


# --- hooks --------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_miss_stores_then_hit_answers_with_zero_usage_per_tenant() -> None:
    plugin = await started()
    first = make_ctx()
    await miss_then_store(plugin, first, "four")
    assert first.response_headers["x-gateway-cache"] == "miss"
    assert first.log["cache"] == "miss"

    hit = make_ctx()
    answer = await plugin.on_request(hit)
    assert answer is not None and answer.status_code == 200
    assert orjson.loads(answer.body)["choices"][0]["message"]["content"] == "four"
    assert hit.response_headers["x-gateway-cache"] == "hit" and hit.log["cache"] == "hit"
    assert hit.usage == Usage(0, 0)
    await plugin.on_response(hit)  # a hit is not stored again (nor does it raise)

    assert await plugin.on_request(make_ctx(tenant="other")) is None  # never crosses tenants
    anonymous = make_ctx(tenant=None)  # no identity: the "default" tenant
    assert await plugin.on_request(anonymous) is None
    await plugin.shutdown()


@pytest.mark.anyio
async def test_sampled_requests_bypass_and_failures_are_not_stored() -> None:
    plugin = await started()
    sampled = make_ctx(temperature=0.7)
    assert await plugin.on_request(sampled) is None
    assert sampled.log["cache"] == "bypass" and "key" not in sampled.scratch_for("cache")

    failed = make_ctx()
    assert await plugin.on_request(failed) is None
    failed.status, failed.error_type = 502, "upstream_error"
    await plugin.on_response(failed)
    blocked = make_ctx()
    assert await plugin.on_request(blocked) is None
    blocked.status, blocked.response = 400, {"error": {}}
    await plugin.on_response(blocked)
    # A 200 whose body is an error object (no choices) is no answer to keep either.
    soft = make_ctx()
    assert await plugin.on_request(soft) is None
    soft.status, soft.response = 200, {"error": {"message": "soft error"}}
    await plugin.on_response(soft)
    assert await plugin.on_request(make_ctx()) is None  # still a miss
    await plugin.shutdown()


@pytest.mark.anyio
async def test_stream_chunks_are_collected_and_replayed_as_sse() -> None:
    plugin = await started()
    opts = {"stream_options": {"include_usage": True}}
    ctx = make_ctx(stream=True, **opts)
    assert await plugin.on_request(ctx) is None
    chunks = [
        {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
         "choices": [{"index": 0, "delta": {"content": piece}}]}
        for piece in ("Hel", "lo")
    ]  # fmt: skip
    for chunk in chunks:
        assert await plugin.on_chunk(ctx, chunk) == [chunk]
    chunks[0]["choices"] = []  # a plugin above mutating the dict later changes nothing stored
    ctx.status, ctx.usage = 200, Usage(4, 2)
    await plugin.on_response(ctx)

    hit = make_ctx(stream=True, **opts)
    answer = await plugin.on_request(hit)
    assert answer is not None and answer.media_type == "text/event-stream"
    body = b"".join([part async for part in answer.body_iterator])  # type: ignore[attr-defined]
    events = [e for e in body.split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]"
    payloads = [orjson.loads(e[6:]) for e in events[:-1]]
    assert [p["choices"][0]["delta"]["content"] for p in payloads[:2]] == ["Hel", "lo"]
    assert payloads[2]["usage"] == {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}
    # The same request not streamed is another entry.
    assert await plugin.on_request(make_ctx(**opts)) is None
    await plugin.shutdown()


@pytest.mark.anyio
async def test_a_hit_gives_back_the_headers_that_describe_the_answer() -> None:
    """RAG's sources header, set by a plugin after the cache on the miss, comes back with the
    hit (plain and streamed); the request's own headers (rate limits) are not stored."""
    plugin = await started()
    sources = "1=handbook/vacation.md#0"
    ctx = make_ctx()
    assert await plugin.on_request(ctx) is None
    ctx.response_headers.update({"x-gateway-rag-sources": sources,
                                 "x-ratelimit-remaining-requests": "9"})  # fmt: skip
    ctx.status, ctx.usage = 200, Usage(7, 3)
    ctx.response = {"id": "x", "choices": [{"message": {"content": "Ten days."}}]}
    await plugin.on_response(ctx)
    hit = make_ctx()
    answer = await plugin.on_request(hit)
    assert answer is not None and orjson.loads(answer.body) == ctx.response
    assert hit.response_headers["x-gateway-rag-sources"] == sources
    assert "x-ratelimit-remaining-requests" not in hit.response_headers

    streamed = make_ctx(stream=True)
    assert await plugin.on_request(streamed) is None
    streamed.response_headers["x-gateway-rag-sources"] = sources
    await plugin.on_chunk(streamed, {"choices": [{"index": 0, "delta": {"content": "Ten"}}]})
    streamed.status, streamed.usage = 200, Usage(7, 1)
    await plugin.on_response(streamed)
    hit = make_ctx(stream=True)
    answer = await plugin.on_request(hit)
    assert answer is not None and hit.response_headers["x-gateway-rag-sources"] == sources
    # An answer without such headers is stored as before.
    plain = make_ctx(temperature=0, seed=1)
    await miss_then_store(plugin, plain, "no sources")
    again = make_ctx(temperature=0, seed=1)
    assert await plugin.on_request(again) is not None
    assert "x-gateway-rag-sources" not in again.response_headers
    await plugin.shutdown()


@pytest.mark.anyio
async def test_oversized_or_dropped_streams_are_not_stored() -> None:
    plugin = await started(max_entry_bytes=200)
    ctx = make_ctx(stream=True)
    await plugin.on_request(ctx)
    await plugin.on_chunk(ctx, {"choices": [{"delta": {"content": "x" * 300}}]})
    ctx.status = 200
    await plugin.on_response(ctx)
    dropped = make_ctx(stream=True)
    await plugin.on_request(dropped)
    await plugin.on_chunk(dropped, {"choices": [{"delta": {"content": "partial"}}]})
    dropped.status, dropped.error_type = 200, "upstream_error"  # stream ended with an error
    await plugin.on_response(dropped)
    assert await plugin.on_request(make_ctx(stream=True)) is None
    await plugin.shutdown()


@pytest.mark.anyio
async def test_redis_store_is_shared_by_two_instances(prefix: str) -> None:
    a = await started(store=REDIS_URL, key_prefix=prefix)
    b = await started(store=REDIS_URL, key_prefix=prefix)
    await miss_then_store(a, make_ctx(), "shared")
    answer = await b.on_request(make_ctx())
    assert answer is not None and b"shared" in answer.body
    await a.shutdown()
    await b.shutdown()


@pytest.mark.anyio
async def test_forwarded_headers_separate_entries_credentials_and_tracing_do_not() -> None:
    plugin = await started()
    ua = [("user-agent", "sdk/1"), ("authorization", "Bearer sk-one"), ("traceparent", "00-1")]
    await miss_then_store(plugin, make_ctx(headers=ua), "first")
    # Another caller of the tenant, another client library and trace: the same question.
    other = [("user-agent", "curl/8"), ("authorization", "Bearer sk-two"), ("traceparent", "00-2")]
    hit = make_ctx(headers=other)
    answer = await plugin.on_request(hit)
    assert answer is not None and hit.response_headers["x-gateway-cache"] == "hit"
    # A header the upstream may act on: another entry, both ways.
    planted = make_ctx(headers=[*other, ("x-vendor-mode", "evil")])
    assert await plugin.on_request(planted) is None
    assert planted.response_headers["x-gateway-cache"] == "miss"
    # Headers the gateway never forwards (its own, hop-by-hop, named by Connection) do not count.
    dropped = [("x-gateway-trace", "1"), ("keep-alive", "5"), ("connection", "x-a"), ("x-a", "1")]
    again = make_ctx(headers=dropped)
    assert await plugin.on_request(again) is not None
    await plugin.shutdown()


@pytest.mark.anyio
async def test_requests_pinning_a_deployment_bypass_the_cache() -> None:
    from types import SimpleNamespace

    from plugins.route import RouteConfig

    route = SimpleNamespace(name="route", config=RouteConfig())
    gateway = SimpleNamespace(
        pipeline=SimpleNamespace(plugins=[SimpleNamespace(name="cache"), route]),
        settings=SimpleNamespace(source="g.yaml"),
    )
    plugin = CachePlugin(CacheConfig())
    await plugin.startup(gateway)  # type: ignore[arg-type]
    await miss_then_store(plugin, make_ctx(), "first")
    pinned = make_ctx(headers=[("x-gateway-deployment", "demo-2")])
    assert await plugin.on_request(pinned) is None
    assert pinned.response_headers["x-gateway-cache"] == "bypass"
    assert await plugin.on_request(make_ctx()) is not None  # unpinned: still a hit
    await plugin.shutdown()


# --- end to end ---------------------------------------------------------------------------------

OTHER_KEY = "sk-test-OtherTenantEeeeeeeeeeeeeeeeeeeeeeeeeeeeee"


def _config(pipeline_extra: list[dict[str, Any]] | None = None, **cache: Any) -> Any:
    auth = base_config()
    auth["keys"] = [*auth["keys"], key_entry(OTHER_KEY, "other1", tenant="globex")]
    return [{"name": "auth", "config": auth}, *(pipeline_extra or []),
            {"name": "cache", "config": cache}]  # fmt: skip


@pytest.fixture(scope="module")
def gw() -> Iterator[Any]:
    limit = {"name": "limit", "config": {"rules": [{"scope": "tenant", "tpm": 100_000}]}}
    # (headers after the cache: its response headers used to be missing from every hit)
    headers = {"name": "headers", "config": {"response": {"x-team": "t1"}}}
    with running_gateway(pipeline=[*_config([limit]), headers]) as running:
        running.api_key = USER_KEY
        yield running


def test_e2e_second_identical_request_is_a_hit_and_upstream_is_not_called(gw: Any) -> None:
    gw.upstream.clear()
    records: list[dict[str, Any]] = []
    gw.gateway.observers.append(lambda ctx, record: records.append(record))
    client = gw.openai()
    msgs = [{"role": "user", "content": f"cache me {uuid.uuid4().hex}"}]
    try:
        first = client.chat.completions.with_raw_response.create(
            model="demo", messages=msgs, temperature=0
        )
        second = client.chat.completions.with_raw_response.create(
            model="demo", messages=msgs, temperature=0
        )
        third = client.chat.completions.with_raw_response.create(
            model="demo", messages=msgs, temperature=0.5
        )
        # Accounting runs right after the last byte went out: the client may be faster.
        deadline = time.monotonic() + 5
        while len(records) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        gw.gateway.observers.pop()
    assert first.headers["x-gateway-cache"] == "miss"
    assert second.headers["x-gateway-cache"] == "hit"
    assert third.headers["x-gateway-cache"] == "bypass"
    assert first.headers["x-team"] == second.headers["x-team"] == "t1"
    assert second.parse().choices[0].message.content == first.parse().choices[0].message.content
    assert len(gw.upstream_requests()) == 2  # the hit never reached the upstream
    assert [r["cache"] for r in records] == ["miss", "hit", "bypass"]
    assert records[0]["prompt_tokens"] > 0 and records[0]["cost_usd"] > 0
    # The hit cost nothing in the log/ledger and the limits.
    assert records[1]["prompt_tokens"] == 0 and records[1]["completion_tokens"] == 0
    assert records[1]["cost_usd"] == 0 and records[1]["status"] == 200


def test_e2e_streamed_hit_replays_through_the_sdk(gw: Any) -> None:
    gw.upstream.clear()
    client = gw.openai()
    msgs = [{"role": "user", "content": f"stream me {uuid.uuid4().hex[:8]} please"}]

    def run() -> tuple[str, str, int | None]:
        raw = client.chat.completions.with_raw_response.create(
            model="demo", messages=msgs, seed=7, stream=True,
            stream_options={"include_usage": True},
        )  # fmt: skip
        text, total = "", None
        for chunk in raw.parse():
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
            if chunk.usage is not None:
                total = chunk.usage.total_tokens
        return raw.headers["x-gateway-cache"], text, total

    first, second = run(), run()
    assert first[0] == "miss" and second[0] == "hit"
    assert second[1] == first[1] and first[1].startswith("Echo: stream me")
    assert second[2] == first[2] and first[2] is not None
    assert len(gw.upstream_requests()) == 1


def test_e2e_tenants_never_share_entries(gw: Any) -> None:
    gw.upstream.clear()
    msgs = [{"role": "user", "content": f"tenant {uuid.uuid4().hex}"}]
    acme = gw.openai().chat.completions.with_raw_response.create(
        model="demo", messages=msgs, temperature=0
    )
    globex = gw.openai(api_key=OTHER_KEY).chat.completions.with_raw_response.create(
        model="demo", messages=msgs, temperature=0
    )
    assert acme.headers["x-gateway-cache"] == "miss"
    assert globex.headers["x-gateway-cache"] == "miss"
    assert len(gw.upstream_requests()) == 2


def test_e2e_a_forwarded_header_cannot_plant_an_answer_for_the_tenant(gw: Any) -> None:
    """The fake upstream answers with ``x-fake-content`` when sent: a caller who adds it must
    not make the cache serve that answer to the tenant's next identical request."""
    gw.upstream.clear()
    body = {"model": "demo", "temperature": 0,
            "messages": [{"role": "user", "content": f"plant {uuid.uuid4().hex}"}]}  # fmt: skip
    url = "/v1/chat/completions"
    with gw.http() as http:
        planted = http.post(url, json=body, headers={"x-fake-content": "PLANTED ANSWER"})
        honest = http.post(
            url, json=body, headers={"user-agent": "o/1", "traceparent": "00-a-b-01"}
        )
        again = http.post(url, json=body, headers={"user-agent": "third/2"})
    assert planted.json()["choices"][0]["message"]["content"] == "PLANTED ANSWER"
    assert planted.headers["x-gateway-cache"] == "miss"
    assert honest.headers["x-gateway-cache"] == "miss"
    assert honest.json()["choices"][0]["message"]["content"].startswith("Echo: plant ")
    # Client metadata and tracing are not part of the key: the honest answer is a hit.
    assert again.headers["x-gateway-cache"] == "hit"
    assert again.json()["choices"] == honest.json()["choices"]
    assert len(gw.upstream_requests()) == 2


@pytest.mark.anyio
async def test_guard_before_cache_is_refused_at_startup() -> None:
    from types import SimpleNamespace

    def gateway(*names: str) -> Any:
        plugins = [SimpleNamespace(name=n) for n in names]
        return SimpleNamespace(
            pipeline=SimpleNamespace(plugins=plugins), settings=SimpleNamespace(source="g.yaml")
        )

    plugin = CachePlugin(CacheConfig())
    with pytest.raises(ConfigError, match=r"g\.yaml: pipeline: 'cache' must come before 'guard'"):
        await plugin.startup(gateway("auth", "guard", "cache"))
    await plugin.startup(gateway("auth", "limit", "cache", "guard", "route"))
    assert plugin.store is not None
    await plugin.shutdown()


@pytest.mark.anyio
async def test_cache_before_auth_is_refused_at_startup() -> None:
    from types import SimpleNamespace

    plugins = [SimpleNamespace(name=n) for n in ("cache", "auth", "route")]
    gateway = SimpleNamespace(
        pipeline=SimpleNamespace(plugins=plugins), settings=SimpleNamespace(source="g.yaml")
    )
    with pytest.raises(ConfigError, match=r"'cache' must come after 'auth'"):
        await CachePlugin(CacheConfig()).startup(gateway)  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_routing_by_tier_or_role_separates_entries_within_a_tenant() -> None:
    """Route rules may send the free tier to a small model and the pro tier to a large one: a
    pro caller got the free tier's cached answer (and a free caller the pro one, for free)."""
    from types import SimpleNamespace

    from plugins.route import RouteConfig

    rules = [{"when": {"tiers": ["pro"]}, "deployments": ["big"]}]
    route = SimpleNamespace(name="route", config=RouteConfig.model_validate({"rules": rules}))
    gateway = SimpleNamespace(
        pipeline=SimpleNamespace(plugins=[SimpleNamespace(name="cache"), route]),
        settings=SimpleNamespace(source="g.yaml"),
    )
    plugin = CachePlugin(CacheConfig())
    await plugin.startup(gateway)  # type: ignore[arg-type]

    def caller(tier: str) -> RequestContext:
        ctx = make_ctx()
        ctx.identity = Identity(user="u", tenant="acme", tier=tier)
        return ctx

    await miss_then_store(plugin, caller("free"), "small model's answer")
    assert await plugin.on_request(caller("pro")) is None  # another entry
    assert await plugin.on_request(caller("free")) is not None
    await plugin.shutdown()


@pytest.mark.anyio
async def test_a_replayed_stream_carries_its_usage_once() -> None:
    """Some upstreams (vLLM) put the usage in their last content chunk, which is stored: the
    replay appended a second usage chunk, and a client adding them up counted it twice."""
    plugin = await started()
    opts = {"stream_options": {"include_usage": True}}
    ctx = make_ctx(stream=True, **opts)
    assert await plugin.on_request(ctx) is None
    usage = {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}
    chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
             "choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": "stop"}],
             "usage": usage}  # fmt: skip
    await plugin.on_chunk(ctx, chunk)
    ctx.status, ctx.usage = 200, Usage(4, 2)
    await plugin.on_response(ctx)
    answer = await plugin.on_request(make_ctx(stream=True, **opts))
    assert answer is not None
    body = b"".join([part async for part in answer.body_iterator])  # type: ignore[attr-defined]
    assert body.count(b'"usage":{') == 1
    await plugin.shutdown()
