"""The shared upstream client: no redirects followed, no cookies kept between users."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

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
