"""JWT bearer tokens: HS256, RS256/ES256 from PEM, JWKS file and JWKS URL, and the attacks."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from aiohttp import web
from jwt.algorithms import get_default_algorithms

from gateway.errors import AuthenticationError, PermissionDeniedError
from plugins.auth import AuthPlugin
from plugins.auth.config import AuthConfig
from tests.plugins.test_auth_support import (
    base_config,
    bearer,
    ec_key,
    make_ctx,
    public_pem,
    rsa_key,
)

ISS = "https://issuer.example"
AUD = "gateway"
HS_SECRET = "hs-secret-0123456789-0123456789-0123456789"


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    data: dict[str, Any] = {
        "sub": "alice",
        "iss": ISS,
        "aud": AUD,
        "exp": now + 300,
        "iat": now,
        "org": "acme",
        "roles": ["user"],
        "tier": "pro",
        "jti": "tok-1",
    }
    data.update(overrides)
    return {k: v for k, v in data.items() if v is not None}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def raw_token(header: dict[str, Any], payload: dict[str, Any], sign: Any = None) -> str:
    """A token built by hand, so headers PyJWT would refuse to write can be tested."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    sig = sign(signing_input.encode()) if sign else b""
    return f"{signing_input}.{b64(sig)}"


def rs256(header: dict[str, Any], payload: dict[str, Any]) -> str:
    alg = get_default_algorithms()["RS256"]
    return raw_token(header, payload, lambda msg: alg.sign(msg, rsa_key()))


def hs256(header: dict[str, Any], payload: dict[str, Any]) -> str:
    return raw_token(
        header, payload, lambda msg: hmac.new(HS_SECRET.encode(), msg, hashlib.sha256).digest()
    )


def plugin_for(tmp_path: Path | None = None, **jwt_cfg: Any) -> AuthPlugin:
    cfg: dict[str, Any] = {
        "enabled": True,
        "issuer": ISS,
        "audience": AUD,
        "claims": {"user": "sub", "tenant": "org", "roles": "roles", "tier": "tier"},
    }
    if "algorithms" not in jwt_cfg or jwt_cfg["algorithms"][0].startswith(("RS", "ES")):
        if not any(k in jwt_cfg for k in ("jwks_file", "jwks_url", "public_key_file")):
            assert tmp_path is not None
            pem = tmp_path / "rsa.pem"
            pem.write_bytes(public_pem(rsa_key()))
            cfg["public_key_file"] = str(pem)
    cfg.update(jwt_cfg)
    return AuthPlugin(AuthConfig.model_validate(base_config(jwt=cfg)))


def hs_plugin(**extra: Any) -> AuthPlugin:
    return plugin_for(algorithms=["HS256"], secret=HS_SECRET, **extra)


async def accept(plugin: AuthPlugin, token: str, **kw: Any) -> Any:
    ctx = make_ctx(bearer(token), **kw)
    await plugin.on_request(ctx)
    assert ctx.identity is not None
    return ctx.identity


async def refuse(plugin: AuthPlugin, token: str) -> None:
    ctx = make_ctx(bearer(token))
    with pytest.raises(AuthenticationError) as info:
        await plugin.on_request(ctx)
    assert info.value.message == "invalid credentials"
    assert ctx.identity is None


def jwk_of(key: Any, kid: str, alg: str) -> dict[str, Any]:
    algo = get_default_algorithms()[alg]
    data = json.loads(algo.to_jwk(key.public_key()))
    return {**data, "kid": kid, "use": "sig", "alg": alg}


# -- happy paths ---------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_hs256_maps_claims_to_identity() -> None:
    ident = await accept(hs_plugin(), jwt.encode(claims(), HS_SECRET, "HS256"))
    assert (ident.user, ident.tenant, ident.roles, ident.tier) == (
        "alice",
        "acme",
        ("user",),
        "pro",
    )
    assert (ident.method, ident.credential_id) == ("jwt", "jwt:tok-1")


@pytest.mark.anyio
async def test_rs256_from_pem_file(tmp_path: Path) -> None:
    token = jwt.encode(claims(), rsa_key(), "RS256")
    assert (await accept(plugin_for(tmp_path), token)).user == "alice"


@pytest.mark.anyio
async def test_es256_from_jwks_file(tmp_path: Path) -> None:
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [jwk_of(ec_key(), "ec1", "ES256")]}))
    plugin = plugin_for(algorithms=["ES256"], jwks_file=str(jwks))
    token = jwt.encode(claims(), ec_key(), "ES256", headers={"kid": "ec1"})
    assert (await accept(plugin, token)).user == "alice"


@pytest.mark.anyio
async def test_roles_as_space_separated_string_and_nested_claims() -> None:
    plugin = hs_plugin(claims={"user": "sub", "roles": "realm.roles", "tenant": "t", "tier": "x"})
    token = jwt.encode(claims(realm={"roles": "user admin"}), HS_SECRET, "HS256")
    ident = await accept(plugin, token)
    assert ident.roles == ("user", "admin")
    assert (ident.tenant, ident.tier) == ("default", "default")


@pytest.mark.anyio
async def test_small_clock_skew_is_allowed() -> None:
    token = jwt.encode(claims(exp=int(time.time()) - 10), HS_SECRET, "HS256")
    assert (await accept(hs_plugin(leeway_s=30), token)).user == "alice"


@pytest.mark.anyio
async def test_token_without_roles_gets_default_roles_or_nothing() -> None:
    token = jwt.encode(claims(roles=None), HS_SECRET, "HS256")
    assert (await accept(hs_plugin(default_roles=["user"]), token)).roles == ("user",)
    with pytest.raises(PermissionDeniedError):
        await hs_plugin().on_request(make_ctx(bearer(token)))


@pytest.mark.anyio
async def test_undefined_roles_in_a_token_grant_nothing() -> None:
    token = jwt.encode(claims(roles=["superuser", "root"]), HS_SECRET, "HS256")
    with pytest.raises(PermissionDeniedError):
        await hs_plugin().on_request(make_ctx(bearer(token)))


@pytest.mark.anyio
async def test_jwt_disabled_means_tokens_are_just_unknown_keys() -> None:
    from tests.plugins.test_auth_support import make_plugin

    with pytest.raises(AuthenticationError):
        await make_plugin().on_request(make_ctx(bearer(jwt.encode(claims(), HS_SECRET, "HS256"))))


# -- attacks -------------------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE"])
async def test_alg_none_in_any_case(alg: str, tmp_path: Path) -> None:
    token = raw_token({"alg": alg, "typ": "JWT"}, claims())
    await refuse(plugin_for(tmp_path), token)
    await refuse(hs_plugin(), token)


@pytest.mark.anyio
async def test_hs256_signed_with_the_rsa_public_key_as_secret(tmp_path: Path) -> None:
    pem = public_pem(rsa_key())
    token = raw_token(
        {"alg": "HS256", "typ": "JWT"},
        claims(),
        lambda msg: hmac.new(pem, msg, hashlib.sha256).digest(),
    )
    await refuse(plugin_for(tmp_path), token)


@pytest.mark.anyio
async def test_bad_signature(tmp_path: Path) -> None:
    head, body, sig = jwt.encode(claims(), rsa_key(), "RS256").split(".")
    await refuse(plugin_for(tmp_path), f"{head}.{body}.{sig[:-4]}AAAA")
    other = jwt.encode(claims(sub="mallory"), rsa_key(), "RS256").split(".")[1]
    await refuse(plugin_for(tmp_path), f"{head}.{other}.{sig}")
    await refuse(hs_plugin(), jwt.encode(claims(), HS_SECRET + "x", "HS256"))


@pytest.mark.anyio
async def test_expired_beyond_leeway() -> None:
    token = jwt.encode(claims(exp=int(time.time()) - 31), HS_SECRET, "HS256")
    await refuse(hs_plugin(leeway_s=30), token)


@pytest.mark.anyio
async def test_not_yet_valid() -> None:
    token = jwt.encode(claims(nbf=int(time.time()) + 120), HS_SECRET, "HS256")
    await refuse(hs_plugin(), token)


@pytest.mark.anyio
@pytest.mark.parametrize("aud", ["other", "gateway2", "gatewa", ["other", "x"], ""])
async def test_wrong_audience(aud: Any) -> None:
    await refuse(hs_plugin(), jwt.encode(claims(aud=aud), HS_SECRET, "HS256"))


@pytest.mark.anyio
@pytest.mark.parametrize(
    "iss",
    [
        "https://evil.example",
        "https://issuer.example.evil",
        "https://issuer.exam",
        "https://issuer.example/",
        "issuer.example",
        [ISS],
    ],
)
async def test_wrong_or_partially_matching_issuer(iss: Any) -> None:
    await refuse(hs_plugin(), hs256({"alg": "HS256"}, claims(iss=iss)))


@pytest.mark.anyio
@pytest.mark.parametrize("claim", ["exp", "iss", "aud", "sub"])
async def test_missing_required_claim(claim: str) -> None:
    await refuse(hs_plugin(), jwt.encode(claims(**{claim: None}), HS_SECRET, "HS256"))


@pytest.mark.anyio
async def test_empty_user_claim() -> None:
    await refuse(hs_plugin(), jwt.encode(claims(sub=""), HS_SECRET, "HS256"))
    await refuse(hs_plugin(), jwt.encode(claims(sub="  "), HS_SECRET, "HS256"))


@pytest.mark.anyio
@pytest.mark.parametrize("claim", ["exp", "nbf", "iat"])
async def test_time_claims_must_be_numbers(claim: str) -> None:
    # PyJWT takes a string through int(): "99999999999" was a token valid until the year 5138.
    value = str(int(time.time()) + (10**11 if claim == "exp" else -60))
    await refuse(hs_plugin(), hs256({"alg": "HS256"}, claims(**{claim: value})))


@pytest.mark.anyio
async def test_unknown_kid(tmp_path: Path) -> None:
    jwks = tmp_path / "jwks.json"
    jwks.write_text(
        json.dumps({"keys": [jwk_of(rsa_key(), "k1", "RS256"), jwk_of(ec_key(), "k2", "ES256")]})
    )
    plugin = plugin_for(algorithms=["RS256"], jwks_file=str(jwks))
    await accept(plugin, jwt.encode(claims(), rsa_key(), "RS256", headers={"kid": "k1"}))
    await refuse(plugin, jwt.encode(claims(), rsa_key(), "RS256", headers={"kid": "k9"}))
    await refuse(plugin, jwt.encode(claims(), rsa_key(), "RS256"))  # no kid, several keys
    # A key published for ES256 may not verify an RS256 token.
    await refuse(plugin, jwt.encode(claims(), rsa_key(), "RS256", headers={"kid": "k2"}))


@pytest.mark.anyio
@pytest.mark.parametrize(
    "kid",
    [
        "../../../../etc/passwd",
        "/dev/null",
        "k1/../k1",
        "' OR '1'='1",
        "k1; DROP TABLE keys",
        "k1\x00",
        "k1\n",  # ("$" matches before a final line break)
        "http://evil.example/key",
        12,
        {"$ne": None},
    ],
)
async def test_kid_with_path_or_sql_text(kid: Any, tmp_path: Path) -> None:
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [jwk_of(rsa_key(), "k1", "RS256")]}))
    plugin = plugin_for(algorithms=["RS256"], jwks_file=str(jwks))
    await refuse(plugin, rs256({"alg": "RS256", "kid": kid}, claims()))


@pytest.fixture
async def jwks_server() -> AsyncIterator[dict[str, Any]]:
    """A JWKS endpoint on loopback that counts its hits; also the target of jku/x5u tricks."""
    state: dict[str, Any] = {"hits": 0, "keys": [jwk_of(rsa_key(), "k1", "RS256")], "evil": 0}

    async def jwks(_: web.Request) -> web.Response:
        state["hits"] += 1
        return web.json_response({"keys": state["keys"]})

    async def evil(_: web.Request) -> web.Response:
        state["evil"] += 1
        return web.json_response({"keys": [jwk_of(ec_key(), "k1", "ES256")]})

    app = web.Application()
    app.router.add_get("/jwks", jwks)
    app.router.add_get("/evil", evil)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    state["url"] = f"http://127.0.0.1:{port}/jwks"
    state["evil_url"] = f"http://127.0.0.1:{port}/evil"
    yield state
    await runner.cleanup()


@pytest.mark.anyio
async def test_a_jwks_sent_in_several_segments_is_read_whole(jwks_server: dict[str, Any]) -> None:
    """``read(n)`` returns what has arrived so far: a JWKS whose body came in two segments
    (TLS records, chunked encoding) was cut, failed to parse, and every token was refused."""
    body = json.dumps({"keys": [jwk_of(rsa_key(), "k1", "RS256")]}).encode()

    async def slow(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"content-type": "application/json"})
        resp.content_length = len(body)
        await resp.prepare(request)
        await resp.write(body[:100])
        await asyncio.sleep(0.05)
        await resp.write(body[100:])
        return resp

    app = web.Application()
    app.router.add_get("/jwks", slow)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        server = {"url": f"http://127.0.0.1:{runner.addresses[0][1]}/jwks"}
        plugin = await url_plugin(server)
        try:
            await accept(plugin, jwt.encode(claims(), rsa_key(), "RS256", headers={"kid": "k1"}))
        finally:
            await plugin.shutdown()
    finally:
        await runner.cleanup()


@pytest.mark.anyio
async def test_a_key_removed_from_the_jwks_stops_verifying(jwks_server: dict[str, Any]) -> None:
    """The JWKS was fetched only at startup and on an unknown kid: a key the issuer removed
    (revoked after a leak) kept verifying tokens until a restart."""
    plugin = await url_plugin(jwks_server, jwks_refresh_s=0.2)
    try:
        token = jwt.encode(claims(), rsa_key(), "RS256", headers={"kid": "k1"})
        await accept(plugin, token)
        jwks_server["keys"] = [jwk_of(ec_key(), "k2", "ES256")]
        for _ in range(100):
            if jwks_server["hits"] >= 2:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.05)  # (the fetch that counted the hit may still be parsing)
        await refuse(plugin, token)
    finally:
        await plugin.shutdown()


async def url_plugin(server: dict[str, Any], **extra: Any) -> AuthPlugin:
    plugin = plugin_for(algorithms=["RS256"], jwks_url=server["url"], **extra)
    await plugin.open(None)
    return plugin


@pytest.mark.anyio
async def test_jwks_url_fetched_at_startup_and_used(jwks_server: dict[str, Any]) -> None:
    plugin = await url_plugin(jwks_server)
    try:
        assert jwks_server["hits"] == 1
        for _ in range(3):
            await accept(plugin, jwt.encode(claims(), rsa_key(), "RS256", headers={"kid": "k1"}))
        assert jwks_server["hits"] == 1
    finally:
        await plugin.shutdown()


@pytest.mark.anyio
async def test_jwks_url_refreshes_on_unknown_kid_at_most_every_30s(
    jwks_server: dict[str, Any],
) -> None:
    plugin = await url_plugin(jwks_server)
    try:
        assert plugin.jwt is not None
        plugin.jwt._last_fetch -= 31  # the startup fetch was "31 s ago"
        jwks_server["keys"].append(jwk_of(ec_key(), "k2", "ES256"))
        await refuse(plugin, rs256({"alg": "RS256", "kid": "k3"}, claims()))
        assert jwks_server["hits"] == 2  # unknown kid: one refresh (which brought k2), no k3
        assert set(plugin.jwt.keys) == {"k1", "k2"}
        for kid in ("k4", "k5", "k6", "k7"):
            await refuse(plugin, rs256({"alg": "RS256", "kid": kid}, claims()))
        assert jwks_server["hits"] == 2  # within 30 s: no more fetches however many kids
    finally:
        await plugin.shutdown()


@pytest.mark.anyio
async def test_rotated_key_is_picked_up_by_the_refresh(jwks_server: dict[str, Any]) -> None:
    plugin = await url_plugin(jwks_server)
    try:
        assert plugin.jwt is not None
        plugin.jwt._last_fetch -= 31
        jwks_server["keys"] = [jwk_of(rsa_key(), "k-new", "RS256")]
        await accept(plugin, jwt.encode(claims(), rsa_key(), "RS256", headers={"kid": "k-new"}))
        assert jwks_server["hits"] == 2
    finally:
        await plugin.shutdown()


@pytest.mark.anyio
@pytest.mark.parametrize("name", ["jku", "x5u"])
async def test_jku_and_x5u_are_refused_and_never_fetched(
    name: str, jwks_server: dict[str, Any]
) -> None:
    plugin = await url_plugin(jwks_server)
    try:
        token = rs256({"alg": "RS256", "kid": "k1", name: jwks_server["evil_url"]}, claims())
        await refuse(plugin, token)
        assert jwks_server["evil"] == 0
    finally:
        await plugin.shutdown()


@pytest.mark.anyio
async def test_embedded_jwk_and_x5c_headers_are_refused(tmp_path: Path) -> None:
    plugin = plugin_for(tmp_path)
    embedded = jwk_of(rsa_key(), "k1", "RS256")
    await refuse(plugin, rs256({"alg": "RS256", "jwk": embedded}, claims()))
    await refuse(plugin, rs256({"alg": "RS256", "x5c": ["MIIB"]}, claims()))


@pytest.mark.anyio
@pytest.mark.parametrize("crit", [["exp-ext"], ["b64"], [], "nope"])
async def test_crit_header_is_refused(crit: Any, tmp_path: Path) -> None:
    await refuse(
        plugin_for(tmp_path), rs256({"alg": "RS256", "crit": crit, "exp-ext": 1}, claims())
    )


@pytest.mark.anyio
async def test_token_over_8kb_is_refused_even_when_validly_signed() -> None:
    token = jwt.encode(claims(pad="x" * 9000), HS_SECRET, "HS256")
    assert len(token) > 8192
    await refuse(hs_plugin(), token)


@pytest.mark.anyio
@pytest.mark.parametrize("token", ["a.b.c", "..", "eyJhbGciOiJIUzI1NiJ9..", "e30.e30.", "x" * 50])
async def test_garbage_tokens(token: str) -> None:
    await refuse(hs_plugin(), token)
