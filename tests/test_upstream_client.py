"""The shared upstream client: no redirects followed, no cookies kept between users."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from aiohttp import web

from tests.helpers import LoopThread, demo_model, running_gateway

MSG = [{"role": "user", "content": "hi"}]


@pytest.fixture
def tricky_upstream() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """An upstream that redirects once, then answers while setting a cookie."""
    seen: list[dict[str, Any]] = []

    async def chat(request: web.Request) -> web.StreamResponse:
        seen.append({"path": request.path, "cookie": request.headers.get("cookie")})
        if request.headers.get("x-echo-bare"):
            # The bare key in a request id, and in an error event in the middle of a stream.
            key = request.headers.get("authorization", "").removeprefix("Bearer ")
            resp = web.StreamResponse(headers={"content-type": "text/event-stream",
                                               "x-request-id": key})  # fmt: skip
            await resp.prepare(request)
            chunk = {
                "id": "c",
                "object": "chat.completion.chunk",
                "created": 0,
                "model": "m",
                "choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": None}],
            }
            await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            error = {"error": {"message": f"upstream crashed handling key {key}", "type": "x"}}
            await resp.write(b"data: " + json.dumps(error).encode() + b"\n\n")
            return resp
        partial = request.headers.get("x-echo-partial")
        if partial:
            # The key cut short and masked ("gsk_CANARYpartKe****"), as some servers quote it.
            key = request.headers.get("authorization", "").removeprefix("Bearer ")
            cut = key[:16] + "****"
            if partial == "400":
                return web.json_response(
                    {"error": {"message": f"invalid model for key {cut}", "type": "invalid"}},
                    status=400, headers={"x-request-id": cut.removesuffix("****")},
                )  # fmt: skip
            resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
            await resp.prepare(request)
            hi = {"choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": None}]}
            await resp.write(b"data: " + json.dumps(hi).encode() + b"\n\n")
            error = {"error": {"message": f"engine died serving key {cut}", "type": "x"}}
            await resp.write(b"data: " + json.dumps(error).encode() + b"\n\n")
            return resp
        if request.headers.get("x-echo-auth"):
            # A misbehaving server quoting the request's credentials, in a 400 and a request id.
            auth = request.headers.get("authorization", "")
            return web.json_response(
                {"error": {"message": f"bad request; your key {auth}", "type": "invalid"}},
                status=400, headers={"x-request-id": f"upreq-{auth}"},
            )  # fmt: skip
        if request.query.get("redirected") is None and request.headers.get("x-redirect"):
            raise web.HTTPFound("/v1/chat/completions?redirected=1")
        resp = web.json_response({
            "id": "c1", "object": "chat.completion", "created": 0, "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        })  # fmt: skip
        resp.set_cookie("session", "user-a-secret")
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/elsewhere/chat/completions", chat)
    thread = LoopThread()

    async def start() -> tuple[web.AppRunner, int]:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return runner, runner.addresses[0][1]

    runner, port = thread.run(start())
    yield f"http://127.0.0.1:{port}", seen
    thread.run(runner.cleanup())
    thread.stop()


def test_upstream_redirect_is_not_followed(tricky_upstream: Any) -> None:
    url, seen = tricky_upstream
    with running_gateway(models=[demo_model(url)]) as gw:
        client = gw.openai(default_headers={"x-redirect": "1"})
        with pytest.raises(openai.InternalServerError) as info:
            client.chat.completions.create(model="demo", messages=MSG)
        assert info.value.status_code == 502
    assert len(seen) == 1  # the Location was never fetched


def test_cookies_set_by_the_upstream_are_not_replayed_for_other_users(tricky_upstream: Any) -> None:
    url, seen = tricky_upstream
    with running_gateway(models=[demo_model(url)]) as gw:
        a = gw.openai(api_key="user-a").chat.completions.create(model="demo", messages=MSG)
        b = gw.openai(api_key="user-b").chat.completions.create(model="demo", messages=MSG)
        assert a.choices[0].message.content == b.choices[0].message.content == "ok"
    assert [s["cookie"] for s in seen] == [None, None]


def test_an_upstream_error_quoting_the_provider_key_reaches_the_client_without_it(
    tricky_upstream: Any,
) -> None:
    url, _ = tricky_upstream
    with running_gateway(models=[demo_model(url)]) as gw:
        client = gw.openai(default_headers={"x-echo-auth": "1"})
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model="demo", messages=MSG)
        err = info.value
        assert "sk-provider-CANARY" not in str(err.body) and "[REDACTED]" in str(err.body)
        assert "x-upstream-request-id" not in err.response.headers
        assert "CANARY" not in str(dict(err.response.headers))


def test_userinfo_never_shows_in_what_a_url_is_logged_as() -> None:
    from gateway.config import ConfigError, parse_settings
    from gateway.ledger.postgres import PostgresBackend
    from gateway.redact import url_for_logs

    for pw in ("4821?CANARYpw", "Xk9/CANARYpw", "a#CANARYpw", "p@ss:CANARYpw"):
        url = f"postgresql://gw:{pw}@127.0.0.1:5432/db?sslmode=require"
        assert url_for_logs(url) == "postgresql://127.0.0.1:5432/db"
        assert "CANARY" not in PostgresBackend(url, "gw").describe()
    # A config error naming the URL's parse failure quoted the password's first part.
    dep = {"provider": "openai", "model": "m", "base_url": "https://u:Xk9/CANARYpw@h/v1"}
    with pytest.raises(ConfigError) as info:
        parse_settings({"models": [{"name": "m", "deployments": [dep]}]})
    assert "base_url" in str(info.value)
    assert "CANARY" not in str(info.value) and "Xk9" not in str(info.value)


@pytest.mark.parametrize("guarded", [False, True])
def test_a_bare_provider_key_echoed_in_a_request_id_or_a_stream_error_stays_home(
    tricky_upstream: Any, guarded: bool
) -> None:
    """The request-id filter looked for 'sk-' only (a Groq 'gsk_' key passed), and a stream's
    error event went to the client as the upstream wrote it."""
    url, _ = tricky_upstream
    key = "gsk_CANARYbareKey0123456789abcdefghij"
    pipeline = [{"name": "guard", "config": {"semantic": {"enabled": False}}}] if guarded else []
    with running_gateway(models=[demo_model(url, api_key=key)], pipeline=pipeline) as gw:
        r = httpx.post(
            f"{gw.url}/v1/chat/completions",
            json={"model": "demo", "messages": MSG, "stream": True},
            headers={"x-echo-bare": "1"},
            timeout=20,
        )
        assert r.status_code == 200
        assert "x-upstream-request-id" not in r.headers
        assert key not in r.text and "CANARY" not in str(dict(r.headers))


def test_a_streams_opening_is_held_until_its_answer_begins() -> None:
    """Comments and a role-only chunk do not begin an answer; an error event before it is the
    deployment's retryable failure, its message without the deployment's key."""
    from gateway.errors import UpstreamError
    from gateway.upstream import begun

    role = b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""},'
    role += b'"logprobs":null,"finish_reason":null}]}\n\n'
    text = b'data: {"choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":null}]}\n\n'
    assert not begun(b": keepalive\n\n")
    assert not begun(b": keepalive\n\n" + role)
    assert not begun(role + text[:20])  # the content event is not complete yet
    assert begun(role + text)
    assert begun(text)
    assert begun(role + b"data: [DONE]\n\n")
    ends = b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n'
    assert begun(role + ends)  # an empty answer is an answer
    # CRLF framing, as the SSE spec allows: the same events (it used to find none, and a
    # short CRLF stream failed as "closed before sending anything").
    crlf = (role + text).replace(b"\n", b"\r\n")
    assert begun(crlf)
    assert not begun(b": keepalive\r\n\r\n" + role.replace(b"\n", b"\r\n"))
    vllm = b'data: {"error": {"message": "overloaded; key sk-secret-0123456789", "code": 503}}\n\n'
    for opening in (vllm, role + vllm, b": ping\n\n" + vllm):
        with pytest.raises(UpstreamError) as info:
            begun(opening, ("sk-secret-0123456789",))
        assert info.value.retryable
        assert (
            info.value.message
            == "the upstream stream began with an error: overloaded; key [REDACTED]"
        )


@pytest.mark.parametrize("guarded", [False, True])
def test_a_provider_key_quoted_cut_short_and_masked_stays_home(
    tricky_upstream: Any, guarded: bool
) -> None:
    """Sixteen leading characters of the key and a mask: cut out of a 400's message, a request
    id and a stream's error event, as the whole key is."""
    url, _ = tricky_upstream
    key = "gsk_CANARYpartKey0123456789abcdef"
    pipeline = [{"name": "guard", "config": {"semantic": {"enabled": False}}}] if guarded else []
    with running_gateway(models=[demo_model(url, api_key=key)], pipeline=pipeline) as gw:
        body = {"model": "demo", "messages": MSG}
        r = httpx.post(f"{gw.url}/v1/chat/completions", json=body,
                       headers={"x-echo-partial": "400"}, timeout=20)  # fmt: skip
        assert r.status_code == 400
        assert r.json()["error"]["message"] == "invalid model for key [REDACTED]****"
        assert "CANARY" not in str(dict(r.headers))
        r = httpx.post(f"{gw.url}/v1/chat/completions", json={**body, "stream": True},
                       headers={"x-echo-partial": "stream"}, timeout=20)  # fmt: skip
        assert r.status_code == 200
        assert "engine died serving key [REDACTED]****" in r.text
        assert "CANARY" not in r.text


def test_scrub_cuts_runs_of_a_keys_leading_characters() -> None:
    from gateway.providers.secrets import scrub, scrub_bytes

    key = "sk-CANARY-route-1234567890"
    assert scrub("key sk-CANARY-route-12**** bad", (key,)) == "key [REDACTED]**** bad"
    assert scrub(f"a {key} b {key[:12]}", (key,)) == "a [REDACTED] b [REDACTED]"
    assert scrub(f"only {key[:11]}", (key,)) == f"only {key[:11]}"  # too short to tell
    assert scrub("short12345 and short1234", ("short12345",)) == "[REDACTED] and short1234"
    assert scrub_bytes(b"x sk-CANARY-route-1x", (key.encode(),)) == b"x [REDACTED]x"
