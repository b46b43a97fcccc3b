"""The auth plugin end to end: the real gateway, the fake upstream, the official openai SDK.

Every refused request also proves the upstream saw nothing."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import jwt
import openai
import pytest

from tests.helpers import RunningGateway, demo_model, running_gateway
from tests.plugins.test_auth_support import (
    ADMIN_KEY,
    OFF_KEY,
    REDIS_URL,
    USER_KEY,
    base_config,
    unique_prefix,
)

JWT_SECRET = "e2e-jwt-secret-0123456789-0123456789-abc"
MSG = [{"role": "user", "content": "hello"}]


def token(**overrides: Any) -> str:
    now = int(time.time())
    claims = {
        "sub": "jane",
        "iss": "https://idp.test",
        "aud": "gateway",
        "exp": now + 300,
        "org": "acme",
        "roles": ["user"],
        **overrides,
    }
    return jwt.encode({k: v for k, v in claims.items() if v is not None}, JWT_SECRET, "HS256")


def config(upstream: str) -> dict[str, Any]:
    auth = base_config(jwt={
        "enabled": True, "algorithms": ["HS256"], "secret": JWT_SECRET,
        "issuer": "https://idp.test", "audience": "gateway",
        "claims": {"user": "sub", "tenant": "org", "roles": "roles", "tier": "tier"},
    })  # fmt: skip
    return {
        # The user role may use "gpt-*": the alias of a model whose name it may not.
        "models": [
            demo_model(upstream),
            {**demo_model(upstream, "o1-secret"), "aliases": ["gpt-secret"]},
        ],
        "pipeline": [{"name": "auth", "config": auth}],
        "logging": {"request_log": "none"},
    }


@pytest.fixture(scope="module")
def gw() -> Iterator[RunningGateway]:
    with running_gateway(config) as running:
        yield running


@pytest.fixture(autouse=True)
def _clean(gw: RunningGateway) -> None:
    gw.upstream.clear()


def raw(gw: RunningGateway, headers: dict[str, str], path: str = "/v1/chat/completions",
        body: dict[str, Any] | None = None) -> httpx.Response:  # fmt: skip
    return httpx.post(
        f"{gw.url}{path}",
        json=body or {"model": "demo", "messages": MSG},
        headers=headers,
        timeout=20,
    )


def assert_401_and_upstream_untouched(gw: RunningGateway, resp: httpx.Response) -> None:
    assert resp.status_code == 401, resp.text
    assert resp.json()["error"] == {
        "message": "invalid credentials",
        "type": "authentication_error",
        "param": None,
        "code": "invalid_api_key",
    }
    assert gw.upstream_requests() == []


def test_sdk_with_an_api_key(gw: RunningGateway) -> None:
    r = gw.openai(api_key=USER_KEY).chat.completions.create(model="demo", messages=MSG)
    assert r.choices[0].message.content == "Echo: hello"
    sent = gw.upstream_requests()[-1]
    # The client's key never travels upstream.
    assert USER_KEY not in repr(sent)


def test_sdk_with_a_jwt(gw: RunningGateway) -> None:
    r = gw.openai(api_key=token()).chat.completions.create(model="demo", messages=MSG)
    assert r.choices[0].message.content == "Echo: hello"


def test_sdk_streaming_with_a_key(gw: RunningGateway) -> None:
    stream = gw.openai(api_key=USER_KEY).chat.completions.create(
        model="demo", messages=MSG, stream=True
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == "Echo: hello"


@pytest.mark.parametrize("key", ["sk-test-unknown", OFF_KEY, "' OR 1=1 --", USER_KEY[:-1]])
def test_sdk_with_a_bad_key_gets_authentication_error(gw: RunningGateway, key: str) -> None:
    with pytest.raises(openai.AuthenticationError) as info:
        gw.openai(api_key=key).chat.completions.create(model="demo", messages=MSG)
    assert info.value.status_code == 401
    assert gw.upstream_requests() == []


def test_model_not_permitted_is_403_through_the_sdk(gw: RunningGateway) -> None:
    with pytest.raises(openai.PermissionDeniedError):
        gw.openai(api_key=USER_KEY).chat.completions.create(model="o1-secret", messages=MSG)
    with pytest.raises(openai.PermissionDeniedError):
        gw.openai(api_key=token()).chat.completions.create(model="o1-secret", messages=MSG)
    assert gw.upstream_requests() == []


def test_models_lists_only_permitted_models(gw: RunningGateway) -> None:
    # Every name the caller may use, aliases too: a model reachable only through its alias was
    # missing from the list, and its retrieve was a 404.
    user = gw.openai(api_key=USER_KEY)
    assert [m.id for m in user.models.list()] == ["demo", "gpt-secret"]
    assert user.models.retrieve("gpt-secret").id == "gpt-secret"
    with pytest.raises(openai.NotFoundError):
        user.models.retrieve("o1-secret")
    assert user.chat.completions.create(model="gpt-secret", messages=MSG).choices
    admin = gw.openai(api_key=ADMIN_KEY)
    assert [m.id for m in admin.models.list()] == ["demo", "o1-secret", "gpt-secret"]
    with pytest.raises(openai.AuthenticationError):
        gw.openai(api_key="sk-nope").models.list()


def test_retrieving_a_model_the_caller_may_not_use_is_404(gw: RunningGateway) -> None:
    # As if it did not exist (the listing hides it too), not 403: no probing for names.
    assert gw.openai(api_key=ADMIN_KEY).models.retrieve("o1-secret").id == "o1-secret"
    assert gw.openai(api_key=USER_KEY).models.retrieve("demo").id == "demo"
    for key in (USER_KEY, token()):
        with pytest.raises(openai.NotFoundError) as info:
            gw.openai(api_key=key).models.retrieve("o1-secret")
        assert info.value.code == "model_not_found"
    with pytest.raises(openai.AuthenticationError):
        gw.openai(api_key="sk-nope").models.retrieve("demo")


@pytest.mark.parametrize(
    "bad",
    [
        lambda: "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0." + token().split(".")[1] + ".",  # alg none
        lambda: token(exp=int(time.time()) - 3600),
        lambda: token(aud="other"),
        lambda: token(iss="https://idp.test.evil"),
        lambda: token(sub=None),
        lambda: jwt.encode(
            {"sub": "x", "iss": "https://idp.test", "aud": "gateway", "exp": int(time.time()) + 60},
            JWT_SECRET + "x",
            "HS256",
        ),
        lambda: token(pad="x" * 9000),
    ],
    ids=["alg-none", "expired", "wrong-aud", "wrong-iss", "no-sub", "bad-sig", "over-8kb"],
)
def test_jwt_attacks_are_401_and_never_reach_upstream(gw: RunningGateway, bad: Any) -> None:
    assert_401_and_upstream_untouched(gw, raw(gw, {"authorization": f"Bearer {bad()}"}))


def test_key_in_query_string_is_not_accepted(gw: RunningGateway) -> None:
    for param in ("api_key", "key", "access_token"):
        resp = raw(gw, {}, path=f"/v1/chat/completions?{param}={USER_KEY}")
        assert_401_and_upstream_untouched(gw, resp)


def test_authorization_header_over_8kb(gw: RunningGateway) -> None:
    resp = raw(gw, {"authorization": "Bearer " + "A" * 9000})
    assert_401_and_upstream_untouched(gw, resp)


def test_x_api_key_header_works_and_host_header_changes_nothing(gw: RunningGateway) -> None:
    assert raw(gw, {"x-api-key": USER_KEY}).status_code == 200
    gw.upstream.clear()
    resp = raw(gw, {"host": "localhost", "x-forwarded-host": "internal"})
    assert_401_and_upstream_untouched(gw, resp)


def test_probes_are_public_and_metrics_are_not(gw: RunningGateway) -> None:
    assert httpx.get(f"{gw.url}/healthz").status_code == 200
    assert httpx.get(f"{gw.url}/readyz").status_code == 200
    assert httpx.get(f"{gw.url}/metrics").status_code == 401
    assert httpx.get(f"{gw.url}/metrics", headers={"x-api-key": USER_KEY}).status_code == 403
    assert httpx.get(f"{gw.url}/metrics", headers={"x-api-key": ADMIN_KEY}).status_code == 200


def test_admin_routes_refuse_users_and_anonymous(gw: RunningGateway) -> None:
    url = f"{gw.url}/admin/keys"
    assert httpx.get(url).status_code == 401
    assert httpx.get(url, headers={"x-api-key": USER_KEY}).status_code == 403
    assert httpx.get(url, headers={"authorization": f"Bearer {token()}"}).status_code == 403
    listing = httpx.get(url, headers={"x-api-key": ADMIN_KEY})
    assert listing.status_code == 200
    assert "user1" in {k["id"] for k in listing.json()["data"]}


@pytest.fixture(scope="module")
def store_gw() -> Iterator[RunningGateway]:
    import redis

    prefix = unique_prefix()

    def cfg(upstream: str) -> dict[str, Any]:
        data = config(upstream)
        data["pipeline"][0]["config"]["store"] = {
            "type": "redis",
            "url": REDIS_URL,
            "prefix": prefix,
        }
        return data

    try:
        with running_gateway(cfg) as running:
            yield running
    finally:
        r = redis.Redis.from_url(REDIS_URL)
        keys = list(r.scan_iter(match=f"{prefix}*"))
        if keys:
            r.delete(*keys)
        r.close()


def test_admin_api_key_lifecycle_through_the_sdk(store_gw: RunningGateway) -> None:
    admin = {"x-api-key": ADMIN_KEY}
    url = f"{store_gw.url}/admin/keys"
    created = httpx.post(url, headers=admin, json={"user": "dave", "id": "dave1"})
    assert created.status_code == 201, created.text
    key = created.json()["key"]
    client = store_gw.openai(api_key=key)
    assert client.chat.completions.create(model="demo", messages=MSG).choices
    assert httpx.delete(f"{url}/dave1", headers=admin).status_code == 200
    store_gw.upstream.clear()
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model="demo", messages=MSG)
    assert store_gw.upstream_requests() == []


def test_minting_a_role_the_caller_lacks_is_403(store_gw: RunningGateway) -> None:
    url = f"{store_gw.url}/admin/keys"
    resp = httpx.post(
        url, headers={"x-api-key": ADMIN_KEY}, json={"user": "eve", "roles": ["embedder"]}
    )
    assert resp.status_code == 403
    resp = httpx.post(url, headers={"x-api-key": USER_KEY}, json={"user": "eve"})
    assert resp.status_code == 403
    listing = httpx.get(url, headers={"x-api-key": ADMIN_KEY}).json()["data"]
    assert all(k["user"] != "eve" for k in listing)


def test_rs256_jwt_from_a_jwks_url_through_the_sdk() -> None:
    from aiohttp import web

    from tests.helpers import LoopThread
    from tests.plugins.test_auth_jwt import jwk_of
    from tests.plugins.test_auth_support import rsa_key

    hits = []

    async def jwks(_: web.Request) -> web.Response:
        hits.append(1)
        return web.json_response({"keys": [jwk_of(rsa_key(), "rsa-1", "RS256")]})

    async def serve() -> tuple[web.AppRunner, int]:
        app = web.Application()
        app.router.add_get("/jwks", jwks)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return runner, runner.addresses[0][1]

    loop = LoopThread()
    runner, port = loop.run(serve())

    def cfg(upstream: str) -> dict[str, Any]:
        data = config(upstream)
        data["pipeline"][0]["config"]["jwt"] = {
            "enabled": True, "algorithms": ["RS256"], "jwks_url": f"http://127.0.0.1:{port}/jwks",
            "issuer": "https://idp.test", "audience": "gateway",
        }  # fmt: skip
        return data

    try:
        with running_gateway(cfg) as gw:
            claims = {"sub": "rita", "iss": "https://idp.test", "aud": "gateway",
                      "exp": int(time.time()) + 300, "roles": ["user"]}  # fmt: skip
            good = jwt.encode(claims, rsa_key(), "RS256", headers={"kid": "rsa-1"})
            reply = gw.openai(api_key=good).chat.completions.create(model="demo", messages=MSG)
            assert reply.choices[0].message.content == "Echo: hello"
            assert len(hits) == 1  # fetched once, at startup
            gw.upstream.clear()
            forged = jwt.encode(claims, JWT_SECRET, "HS256", headers={"kid": "rsa-1"})
            with pytest.raises(openai.AuthenticationError):
                gw.openai(api_key=forged).chat.completions.create(model="demo", messages=MSG)
            assert gw.upstream_requests() == []
    finally:
        loop.run(runner.cleanup())
        loop.stop()


def test_metrics_take_the_scrape_token_or_a_key_with_the_metrics_role() -> None:
    from tests.plugins.test_auth_support import base_config

    token = "scrape-token-0123456789"
    with running_gateway(pipeline=[{"name": "auth", "config": base_config()}],
                         metrics={"bearer_token": token}) as gw:  # fmt: skip
        url = f"{gw.url}/metrics"
        assert httpx.get(url, headers={"authorization": f"Bearer {token}"}).status_code == 200
        assert httpx.get(url, headers={"x-api-key": ADMIN_KEY}).status_code == 200
        assert httpx.get(url, headers={"x-api-key": USER_KEY}).status_code == 403
        assert httpx.get(url, headers={"authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(url).status_code == 401
    # Without an auth plugin the token is the only way in.
    with running_gateway(metrics={"bearer_token": token}) as gw:
        url = f"{gw.url}/metrics"
        assert httpx.get(url, headers={"authorization": f"Bearer {token}"}).status_code == 200
        assert httpx.get(url, headers={"authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(url).status_code == 401
