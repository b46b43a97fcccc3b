"""How long the gateway waits for an upstream's answer to begin: a stream's first bytes are
bounded by ``upstream.first_byte_timeout_s``; a plain answer (chat without ``stream``,
embeddings), whose headers come only once the whole answer is written, by
``upstream.response_timeout_s`` (OpenAI's SDK waits up to 600 s); and the route plugin's
``deadline_s`` / ``plain_deadline_s`` likewise. The fake upstream's ``hang_ms`` is the time
before its response headers."""

from __future__ import annotations

import time
from typing import Any

import openai
import pytest

from tests.helpers import running_gateway

MSG = [{"role": "user", "content": "hello"}]


def embeddings_model(url: str, **sections: Any) -> dict[str, Any]:
    return {
        "models": [{"name": "emb", "kind": "embeddings", "deployments": [
            {"model": "e-up", "base_url": f"{url}/v1"}]}],
        "logging": {"request_log": "none"},
        **sections,
    }  # fmt: skip


@pytest.mark.parametrize(
    "upstream",
    [
        {"first_byte_timeout_s": 0.3, "response_timeout_s": 3},
        # aiohttp's read timeout would bound the wait for the headers too.
        {"first_byte_timeout_s": 0.3, "read_timeout_s": 0.3, "response_timeout_s": 3},
    ],
    ids=["first_byte", "first_byte+read"],
)
def test_a_plain_answer_slower_than_the_first_byte_timeout_arrives(
    upstream: dict[str, Any],
) -> None:
    """A plain answer that takes 1 s to write (a reasoning model's minutes, scaled down) is
    waited for: the first-byte and read timeouts are for streams, not for it."""
    with running_gateway(fake={"hang_ms": 1000}, upstream=upstream) as gw:
        started = time.perf_counter()
        resp = gw.openai().chat.completions.create(model="demo", messages=MSG)
        assert time.perf_counter() - started >= 1.0
        assert resp.choices[0].message.content == "Echo: hello"
        assert len(gw.upstream_requests()) == 1


def test_a_plain_answer_past_the_response_timeout_is_a_504() -> None:
    upstream = {"first_byte_timeout_s": 10, "response_timeout_s": 0.5}
    with running_gateway(fake={"hang_ms": 3000}, upstream=upstream) as gw:
        started = time.perf_counter()
        with pytest.raises(openai.APIStatusError) as info:
            gw.openai().chat.completions.create(model="demo", messages=MSG)
        took = time.perf_counter() - started
        assert info.value.status_code == 504
        assert info.value.type == "timeout"
        assert 0.5 <= took < 2.5, took


def test_a_stream_is_still_bounded_by_the_first_byte_timeout() -> None:
    """The response timeout (long) does not stretch a stream's wait for its first bytes, and
    (short) does not cut it either."""
    upstream = {"first_byte_timeout_s": 0.5, "response_timeout_s": 10}
    with running_gateway(fake={"hang_ms": 3000}, upstream=upstream) as gw:
        started = time.perf_counter()
        with pytest.raises(openai.APIStatusError) as info:
            gw.openai().chat.completions.create(model="demo", messages=MSG, stream=True)
        assert info.value.status_code == 504 and info.value.type == "timeout"
        assert time.perf_counter() - started < 2.5
    upstream = {"first_byte_timeout_s": 5, "response_timeout_s": 0.3}
    with running_gateway(fake={"hang_ms": 1000}, upstream=upstream) as gw:
        stream = gw.openai().chat.completions.create(model="demo", messages=MSG, stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert text == "Echo: hello"


def test_a_stream_slower_to_begin_than_the_read_timeout_arrives() -> None:
    """The read timeout bounds the silences of a stream's body once its headers came, not
    the wait for them: that is the first-byte timeout's (a model slow to start, 1 s here,
    under a 5 s first-byte timeout and a 0.3 s read timeout)."""
    upstream = {"first_byte_timeout_s": 5, "read_timeout_s": 0.3}
    with running_gateway(fake={"hang_ms": 1000}, upstream=upstream) as gw:
        started = time.perf_counter()
        stream = gw.openai().chat.completions.create(model="demo", messages=MSG, stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert time.perf_counter() - started >= 1.0
        assert text == "Echo: hello"


def test_embeddings_wait_for_the_response_timeout() -> None:
    def build(url: str) -> dict[str, Any]:
        return embeddings_model(
            url, upstream={"first_byte_timeout_s": 0.3, "response_timeout_s": 3}
        )

    with running_gateway(build, fake={"hang_ms": 1000}) as gw:
        r = gw.openai().embeddings.create(model="emb", input=["a", "b"])
        assert len(r.data) == 2

    def build_short(url: str) -> dict[str, Any]:
        return embeddings_model(
            url, upstream={"first_byte_timeout_s": 10, "response_timeout_s": 0.5}
        )

    with running_gateway(build_short, fake={"hang_ms": 3000}) as gw:
        started = time.perf_counter()
        with pytest.raises(openai.APIStatusError) as info:
            gw.openai().embeddings.create(model="emb", input=["a"])
        assert info.value.status_code == 504 and info.value.type == "timeout"
        assert time.perf_counter() - started < 2.5


def test_a_plain_body_stalling_after_its_headers_is_cut_at_the_read_timeout() -> None:
    """The response timeout ends with the headers; the body after them is bounded by the read
    timeout, as before: 20 bytes of it, then silence on an open connection."""
    upstream = {"read_timeout_s": 0.4, "response_timeout_s": 10}
    with running_gateway(fake={"stall_after": 20}, upstream=upstream) as gw:
        started = time.perf_counter()
        with pytest.raises(openai.APIStatusError) as info:
            gw.openai().chat.completions.create(model="demo", messages=MSG)
        took = time.perf_counter() - started
        assert info.value.status_code == 504 and info.value.type == "timeout"
        assert 0.4 <= took < 2.5, took


def route_config(url: str, route: dict[str, Any], upstream: dict[str, Any]) -> dict[str, Any]:
    return {
        "models": [{"name": "solo", "deployments": [
            {"id": "solo-a", "model": "solo-up", "base_url": f"{url}/v1"}]}],
        "pipeline": [{"name": "route", "config": route}],
        "upstream": upstream,
        "logging": {"request_log": "none"},
    }  # fmt: skip


def test_the_route_deadline_of_a_plain_request_is_plain_deadline_s() -> None:
    """``deadline_s`` (0.5 s) bounds a stream until it begins; a plain answer, 1 s to write,
    is bounded by ``plain_deadline_s`` (default 600 s), so it is not cut at ``deadline_s``."""
    upstream = {"first_byte_timeout_s": 10}

    def build(url: str) -> dict[str, Any]:
        return route_config(url, {"deadline_s": 0.5}, upstream)

    with running_gateway(build, fake={"hang_ms": 1000}) as gw:
        resp = gw.openai().chat.completions.create(model="solo", messages=MSG)
        assert resp.choices[0].message.content == "Echo: hello"
        started = time.perf_counter()
        with pytest.raises(openai.APIStatusError) as info:
            gw.openai().chat.completions.create(model="solo", messages=MSG, stream=True)
        assert info.value.status_code == 504
        assert time.perf_counter() - started < 0.95

    def build_short(url: str) -> dict[str, Any]:
        return route_config(url, {"deadline_s": 10, "plain_deadline_s": 0.5}, upstream)

    with running_gateway(build_short, fake={"hang_ms": 1000}) as gw:
        started = time.perf_counter()
        with pytest.raises(openai.APIStatusError) as info:
            gw.openai().chat.completions.create(model="solo", messages=MSG)
        assert info.value.status_code == 504 and info.value.type == "timeout"
        assert time.perf_counter() - started < 0.95
        stream = gw.openai().chat.completions.create(model="solo", messages=MSG, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
