"""The Redis key store, its cache, and the admin API (``/admin/keys``) over ASGI."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest
import redis.asyncio as aioredis
from starlette.applications import Starlette

from gateway.errors import AuthenticationError, ServiceUnavailableError
from plugins.auth import AuthPlugin
from plugins.auth.admin import admin_routes
from plugins.auth.config import AuthConfig
from plugins.auth.keys import KeyRecord, hash_key
from plugins.auth.store import KeyConflictError, RedisKeyStore, TTLCache
from tests.plugins.test_auth_support import (
    ADMIN_KEY,
    REDIS_URL,
    SECRET,
    USER_KEY,
    base_config,
    bearer,
    make_ctx,
    make_plugin,
    unique_prefix,
)


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    """A fresh Redis key prefix per test; everything under it is deleted afterwards."""
    p = unique_prefix()
    yield p
    r = aioredis.Redis.from_url(REDIS_URL)
    try:
        keys = [k async for k in r.scan_iter(match=f"{p}*")]
        if keys:
            await r.delete(*keys)
    finally:
        await r.aclose()


async def store_plugin(prefix: str, ttl: float = 5.0, **overrides: Any) -> AuthPlugin:
    cfg = base_config(
        store={"type": "redis", "url": REDIS_URL, "prefix": prefix, "cache_ttl_s": ttl}, **overrides
    )
    plugin = AuthPlugin(AuthConfig.model_validate(cfg))
    await plugin.open(None)
    return plugin


def record(key: str, key_id: str, **kw: Any) -> KeyRecord:
    return KeyRecord(
        id=key_id,
        digest=hash_key(SECRET.encode(), key),
        user=f"{key_id}-user",
        roles=("user",),
        source="store",
        **kw,
    )


@pytest.fixture
async def admin(prefix: str) -> AsyncIterator[tuple[AuthPlugin, httpx.AsyncClient]]:
    plugin = await store_plugin(prefix)
    app = Starlette(routes=admin_routes(plugin))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
        yield plugin, client
    await plugin.shutdown()


# -- store and cache -----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_store_create_get_list_delete(prefix: str) -> None:
    store = RedisKeyStore(REDIS_URL, prefix)
    try:
        rec = record("sk-store-one", "one", tier="pro")
        await store.create(rec)
        with pytest.raises(KeyConflictError):
            await store.create(record("sk-store-other", "one"))
        got = await store.get(rec.digest)
        assert got is not None and (got.id, got.tier, got.source) == ("one", "pro", "store")
        assert [r.id for r in await store.list()] == ["one"]
        assert (await store.delete("one")) is not None
        assert await store.get(rec.digest) is None
        assert await store.delete("one") is None
        # Only the digest is stored: the key text appears nowhere in Redis.
        raw = b"".join(
            [
                await store.redis.dump(k) or b""
                async for k in store.redis.scan_iter(match=f"{prefix}*")
            ]
        )
        assert b"sk-store-one" not in raw
    finally:
        await store.close()


def test_ttl_cache_expires_and_evicts_least_recently_used() -> None:
    cache = TTLCache(size=2, ttl_s=60)
    a, b, c = record("a", "a"), record("b", "b"), record("c", "c")
    cache.put(a.digest, a)
    cache.put(b.digest, b)
    assert cache.get(a.digest) == (True, a)  # a is now most recent
    cache.put(c.digest, c)
    assert cache.get(b.digest) == (False, None)
    assert cache.get(a.digest)[0] and cache.get(c.digest)[0]
    cache.put(b"miss", None)
    assert cache.get(b"miss") == (True, None)
    cache.ttl_s = 0.0
    cache.put(b"x", None)
    assert cache.get(b"x") == (False, None)


@pytest.mark.anyio
async def test_store_key_authenticates_and_is_cached(prefix: str) -> None:
    plugin = await store_plugin(prefix)
    try:
        assert plugin.store is not None
        await plugin.store.create(record("sk-store-key", "s1"))
        calls = 0
        real_get = plugin.store.get

        async def counting(digest: bytes) -> KeyRecord | None:
            nonlocal calls
            calls += 1
            return await real_get(digest)

        plugin.store.get = counting  # type: ignore[method-assign]
        for _ in range(5):
            ctx = make_ctx(bearer("sk-store-key"))
            await plugin.on_request(ctx)
            assert ctx.identity is not None and ctx.identity.credential_id == "s1"
        for _ in range(5):
            with pytest.raises(AuthenticationError):
                await plugin.on_request(make_ctx(bearer("sk-store-unknown")))
        assert calls == 2  # one hit and one miss, each cached
        # Config keys never touch the store.
        await plugin.on_request(make_ctx(bearer(USER_KEY)))
        assert calls == 2
    finally:
        await plugin.shutdown()


@pytest.mark.anyio
async def test_revocation_reaches_another_replica_within_the_cache_ttl(prefix: str) -> None:
    replica_a = await store_plugin(prefix, ttl=0.3)
    replica_b = await store_plugin(prefix, ttl=0.3)
    try:
        assert replica_a.store is not None
        await replica_a.store.create(record("sk-store-shared", "shared"))
        await replica_b.on_request(make_ctx(bearer("sk-store-shared")))
        await replica_a.store.delete("shared")
        await asyncio.sleep(0.35)
        with pytest.raises(AuthenticationError):
            await replica_b.on_request(make_ctx(bearer("sk-store-shared")))
    finally:
        await replica_a.shutdown()
        await replica_b.shutdown()


@pytest.mark.anyio
async def test_disabled_and_expired_store_keys_are_refused(prefix: str) -> None:
    plugin = await store_plugin(prefix)
    try:
        assert plugin.store is not None
        await plugin.store.create(record("sk-store-off", "off", disabled=True))
        await plugin.store.create(record("sk-store-old", "old", expires_at=1.0))
        for key in ("sk-store-off", "sk-store-old"):
            with pytest.raises(AuthenticationError):
                await plugin.on_request(make_ctx(bearer(key)))
    finally:
        await plugin.shutdown()


@pytest.mark.anyio
async def test_unreachable_store_fails_startup_without_leaking_the_password() -> None:
    # "/" in a password ends the host part for a URL parser, which then shows its first part.
    for password in ("hunter2", "hun/ter2", "hun?ter2"):
        cfg = base_config(store={"type": "redis", "url": f"redis://:{password}@127.0.0.1:1/0"})
        plugin = AuthPlugin(AuthConfig.model_validate(cfg))
        with pytest.raises(RuntimeError) as info:
            await plugin.open(None)
        assert "cannot reach the key store at redis://127.0.0.1:1/0" in str(info.value)
        assert "hun" not in str(info.value)


@pytest.mark.anyio
async def test_store_outage_after_startup_fails_closed_with_503() -> None:
    plugin = make_plugin()
    plugin.store = RedisKeyStore("redis://127.0.0.1:1/0", "x:")
    try:
        with pytest.raises(ServiceUnavailableError):
            await plugin.on_request(make_ctx(bearer("sk-not-in-config")))
        await plugin.on_request(make_ctx(bearer(USER_KEY)))  # config keys keep working
    finally:
        await plugin.shutdown()


# -- admin API -----------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_admin_creates_a_key_that_works_and_is_shown_once(
    admin: tuple[AuthPlugin, httpx.AsyncClient], caplog: pytest.LogCaptureFixture
) -> None:
    plugin, client = admin
    caplog.set_level(logging.INFO, logger="gateway.auth")
    resp = await client.post(
        "/admin/keys",
        headers=bearer(ADMIN_KEY),
        json={"user": "bob", "roles": ["user"], "tier": "pro", "id": "bob1"},
    )
    assert resp.status_code == 201, resp.text
    assert resp.headers["cache-control"] == "no-store"
    body = resp.json()
    key = body["key"]
    assert key.startswith("sk-gw-") and body["prefix"] == key[:10]
    assert (body["id"], body["user"], body["tenant"], body["created_by"]) == (
        "bob1",
        "bob",
        "acme",
        "admin1-user",
    )
    ctx = make_ctx(bearer(key))
    await plugin.on_request(ctx)
    assert ctx.identity is not None and (ctx.identity.user, ctx.identity.tier) == ("bob", "pro")
    listing = (await client.get("/admin/keys", headers=bearer(ADMIN_KEY))).json()
    assert {k["id"] for k in listing["data"]} == {"user1", "admin1", "off1", "old1", "bob1"}
    assert key not in orjson.dumps(listing).decode()
    assert "digest" not in listing["data"][0] and "hash" not in listing["data"][0]
    one = await client.get("/admin/keys/bob1", headers=bearer(ADMIN_KEY))
    assert one.json()["prefix"] == body["prefix"] and "key" not in one.json()
    events = [r.event for r in caplog.records if hasattr(r, "event")]  # type: ignore[attr-defined]
    assert events == ["auth.key_created"]
    assert plugin.store is not None
    audit = [
        orjson.loads(e) for e in await plugin.store.redis.lrange(plugin.store.audit_key, 0, -1)
    ]
    assert audit[0]["key_id"] == "bob1" and audit[0]["actor"] == "admin1-user"


@pytest.mark.anyio
async def test_admin_deletes_a_key_and_it_stops_working_at_once(
    admin: tuple[AuthPlugin, httpx.AsyncClient],
) -> None:
    plugin, client = admin
    key = (
        await client.post(
            "/admin/keys", headers=bearer(ADMIN_KEY), json={"user": "carol", "id": "c1"}
        )
    ).json()["key"]
    await plugin.on_request(make_ctx(bearer(key)))  # now cached
    resp = await client.delete("/admin/keys/c1", headers=bearer(ADMIN_KEY))
    assert resp.status_code == 200 and resp.json()["deleted"] is True
    with pytest.raises(AuthenticationError):
        await plugin.on_request(make_ctx(bearer(key)))
    assert (await client.delete("/admin/keys/c1", headers=bearer(ADMIN_KEY))).status_code == 404
    assert plugin.store is not None
    audit = [
        orjson.loads(e) for e in await plugin.store.redis.lrange(plugin.store.audit_key, 0, -1)
    ]
    assert [e["event"] for e in audit] == ["auth.key_deleted", "auth.key_created"]


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/admin/keys"),
        ("POST", "/admin/keys"),
        ("GET", "/admin/keys/user1"),
        ("DELETE", "/admin/keys/user1"),
    ],
)
async def test_admin_routes_need_credentials_and_the_admin_role(
    method: str, path: str, admin: tuple[AuthPlugin, httpx.AsyncClient]
) -> None:
    _, client = admin
    anon = await client.request(method, path, json={"user": "x"})
    assert anon.status_code == 401
    assert anon.json()["error"] == {
        "message": "invalid credentials",
        "type": "authentication_error",
        "param": None,
        "code": "invalid_api_key",
    }
    user = await client.request(method, path, headers=bearer(USER_KEY), json={"user": "x"})
    assert user.status_code == 403
    assert user.json()["error"]["type"] == "permission_error"


@pytest.mark.anyio
async def test_minting_roles_the_caller_does_not_hold_is_403(
    admin: tuple[AuthPlugin, httpx.AsyncClient],
) -> None:
    plugin, client = admin
    resp = await client.post(
        "/admin/keys", headers=bearer(ADMIN_KEY), json={"user": "eve", "roles": ["embedder"]}
    )
    assert resp.status_code == 403
    assert resp.json()["error"]["message"] == "you may not grant roles you do not hold"
    assert plugin.store is not None and await plugin.store.list() == []


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"user": "x", "roles": ["root"]}, "unknown role 'root'"),
        ({"roles": ["user"]}, "user: Field required"),
        ({"user": "x", "id": "../etc"}, "id: String should match pattern"),
        ({"user": "x", "id": "user1"}, "key id 'user1' is already used in config.yaml"),
        ({"user": "x", "secret": 1}, "unknown key 'secret'"),
    ],
)
async def test_bad_create_requests_are_400(
    body: dict[str, Any], message: str, admin: tuple[AuthPlugin, httpx.AsyncClient]
) -> None:
    _, client = admin
    resp = await client.post("/admin/keys", headers=bearer(ADMIN_KEY), json=body)
    assert resp.status_code == 400
    assert message in resp.json()["error"]["message"]


@pytest.mark.anyio
async def test_duplicate_id_and_config_key_deletion_are_400(
    admin: tuple[AuthPlugin, httpx.AsyncClient],
) -> None:
    _, client = admin
    ok = await client.post("/admin/keys", headers=bearer(ADMIN_KEY), json={"user": "d", "id": "d"})
    assert ok.status_code == 201
    dup = await client.post("/admin/keys", headers=bearer(ADMIN_KEY), json={"user": "d", "id": "d"})
    assert dup.status_code == 400 and "already exists" in dup.json()["error"]["message"]
    cfg = await client.delete("/admin/keys/user1", headers=bearer(ADMIN_KEY))
    assert cfg.status_code == 400 and "config.yaml" in cfg.json()["error"]["message"]


@pytest.mark.anyio
async def test_created_key_with_past_expiry_is_refused(
    admin: tuple[AuthPlugin, httpx.AsyncClient],
) -> None:
    _, client = admin
    # A key dead on arrival was created (201); two expiries, and a 292-billion-year one, too.
    for body in (
        {"user": "f", "expires_at": "2001-01-01T00:00:00"},
        {"user": "f", "expires_at": "2999-01-01T00:00:00", "expires_in_s": 60},
        {"user": "f", "expires_in_s": 9223372036854775807},
    ):
        resp = await client.post("/admin/keys", headers=bearer(ADMIN_KEY), json=body)
        assert resp.status_code == 400, body
        assert "expires" in resp.json()["error"]["message"]


@pytest.mark.anyio
async def test_admin_api_without_a_store_says_so() -> None:
    plugin = make_plugin()
    app = Starlette(routes=admin_routes(plugin))
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://gw"
    ) as client:
        resp = await client.post("/admin/keys", headers=bearer(ADMIN_KEY), json={"user": "x"})
        assert resp.status_code == 400
        assert "no key store is configured" in resp.json()["error"]["message"]
        listing = await client.get("/admin/keys", headers=bearer(ADMIN_KEY))
        assert [k["source"] for k in listing.json()["data"]] == ["config"] * 4
