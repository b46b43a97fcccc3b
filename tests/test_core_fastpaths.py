"""The core's per-request shortcuts give exactly what the plain code they replace gave."""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import math
import random
import struct
from typing import Any

import pytest

from gateway.accounting import fast_round
from gateway.config import RequestsConfig, UpstreamConfig
from gateway.context import RequestContext
from gateway.errors import InvalidRequestError
from gateway.headers import upstream_request_headers
from gateway.providers.base import make_session
from gateway.validate import RequestLimits, validate_chat


def _bits(x: float) -> bytes:
    return struct.pack("<d", x)


def test_fast_round_is_round_bit_for_bit() -> None:
    rng = random.Random(3)
    values: list[tuple[float, int]] = []
    for _ in range(50_000):
        digits = rng.choice((2, 3, 8))
        values.append((10 ** rng.uniform(-12, 13), digits))
        # ties at the rounding digit and their float neighbours
        tie = (rng.randrange(10 ** rng.randint(1, 12)) + 0.5) / 10**digits
        values += [(tie, digits), (math.nextafter(tie, 0), digits),
                   (math.nextafter(tie, math.inf), digits)]  # fmt: skip
    values += [(x, d) for x in (0.0, -0.0, -1.5, 1e20, 5e-324, 0.0005) for d in (2, 3, 8)]
    for x, digits in values:
        got, want = fast_round(x, digits), round(x, digits)
        assert type(got) is float and _bits(got) == _bits(want), (x, digits, got, want)
    assert math.isnan(fast_round(math.nan, 3))


def test_request_context_init_sets_every_field() -> None:
    names = [f.name for f in dataclasses.fields(RequestContext)]
    params = list(inspect.signature(RequestContext.__init__).parameters)[1:]
    assert params == names  # a field added to the class must be added to __init__ too
    a = RequestContext("r", "chat", "/p", "POST", {}, [], {})
    b = RequestContext("r", "chat", "/p", "POST", {}, [], {})
    for name in names:
        getattr(a, name)
    assert a.started > 0 and a.candidates == [] and a.log == {}
    assert a.candidates is not b.candidates and a.scratch is not b.scratch  # fresh containers


def _error(body: dict[str, Any]) -> str | None:
    with pytest.raises(InvalidRequestError) as info:
        validate_chat(body, RequestLimits(RequestsConfig(max_tokens=100, max_n=2)))
    return info.value.param


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"stop": 5, "temperature": 9}, "temperature"),
        ({"logit_bias": 1, "max_tokens": 0, "top_p": 2}, "top_p"),
        ({"user": 1, "tools": "x"}, "tools"),
        ({"metadata": [], "user": 3}, "user"),
        ({"seed": "x", "n": 3, "max_completion_tokens": 0}, "max_completion_tokens"),
        ({"response_format": {}, "stop": ["a"] * 5}, "stop"),
        ({"max_tokens": 101}, "max_tokens"),
    ],
)
def test_several_bad_fields_report_the_first_in_the_fixed_order(
    extra: dict[str, Any], param: str
) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **extra}
    assert _error(body) == param


def test_request_limits_copy_every_setting() -> None:
    cfg = RequestsConfig(max_body_bytes=5, max_tokens=6, max_n=7, max_messages=8,
                         extra_params=("top_k",))  # fmt: skip
    limits = RequestLimits(cfg)
    assert {name: getattr(limits, name) for name in RequestsConfig.model_fields} == dict(cfg)
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "top_k": 3}
    assert validate_chat(body, limits) == "m"
    with pytest.raises(InvalidRequestError, match="max_tokens"):
        validate_chat({**body, "max_tokens": 7}, limits)


def test_upstream_headers_drop_in_any_case() -> None:
    pairs = [("Host", "h"), ("authorization", "Bearer k"), ("Connection", "x-drop"),
             ("X-Drop", "1"), ("X-Forwarded-For", "1.2.3.4"), ("X-Keep", "v")]  # fmt: skip
    out = upstream_request_headers(pairs, {"Authorization": "Bearer up"}, {}, "rid")
    assert out == [("x-keep", "v"), ("authorization", "Bearer up"),
                   ("content-type", "application/json"), ("x-request-id", "rid")]  # fmt: skip


@pytest.mark.anyio
async def test_the_upstream_client_adds_no_user_agent() -> None:
    """The client's own User-Agent is passed on; aiohttp's is never added."""
    heads: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                break
            length = next(int(line.split(b":")[1]) for line in head.lower().split(b"\r\n")
                          if line.startswith(b"content-length:"))  # fmt: skip
            await reader.readexactly(length)
            heads.append(head.lower())
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    session = make_session(UpstreamConfig())
    try:
        for headers in ({}, {"user-agent": "client/1"}):
            async with session.post(f"http://127.0.0.1:{port}/x", data=b"{}",
                                    headers=headers) as resp:  # fmt: skip
                assert resp.status == 200
    finally:
        await session.close()
        server.close()
    assert b"user-agent" not in heads[0]
    assert b"\r\nuser-agent: client/1\r\n" in heads[1]
    assert all(b"\r\naccept: */*\r\n" in h and b"\r\naccept-encoding: " in h for h in heads)


@pytest.mark.anyio
async def test_read_body_in_one_message_or_several() -> None:
    from gateway.body import read_body
    from gateway.errors import PayloadTooLargeError

    def receiver(*messages: dict[str, Any]) -> Any:
        it = iter(messages)

        async def receive() -> dict[str, Any]:
            return next(it)

        return receive

    def ctx() -> RequestContext:
        return RequestContext("r", "chat", "/p", "POST", {}, [], {})

    one = receiver({"type": "http.request", "body": b"abc"})
    assert await read_body(one, ctx(), 10) == b"abc"
    parts = receiver({"type": "http.request", "body": b"ab", "more_body": True},
                     {"type": "http.request", "body": b"", "more_body": True},
                     {"type": "http.request", "body": b"c"})  # fmt: skip
    assert await read_body(parts, ctx(), 10) == b"abc"
    with pytest.raises(PayloadTooLargeError):
        await read_body(receiver({"type": "http.request", "body": b"x" * 11}), ctx(), 10)
    with pytest.raises(PayloadTooLargeError):
        six = {"type": "http.request", "body": b"x" * 6}
        await read_body(receiver({**six, "more_body": True}, six), ctx(), 10)
    gone = ctx()
    with pytest.raises(InvalidRequestError):
        await read_body(receiver({"type": "http.request", "body": b"a", "more_body": True},
                                 {"type": "http.disconnect"}), gone, 10)  # fmt: skip
    assert gone.client_disconnected
    with pytest.raises(InvalidRequestError):
        await read_body(receiver({"type": "http.disconnect"}), ctx(), 10)


def test_accounting_reads_the_deployment_once_and_logs_what_it_says() -> None:
    """The request log's deployment fields and cost, from the values accounting keeps per
    (entry, deployment): the same as reading the models each time, for each deployment."""
    from types import SimpleNamespace

    from gateway.accounting import account, fast_round
    from gateway.catalogue import Catalogue, ModelEntry
    from gateway.config import LoggingConfig
    from gateway.context import Usage

    entry = ModelEntry.model_validate({"name": "acc-m", "aliases": ["acc-alias"], "deployments": [
        {"model": "up-a", "base_url": "http://a", "price": {"input_per_mtok": 0.15,
                                                            "output_per_mtok": 0.6}},
        {"model": "up-b", "base_url": "http://b", "provider": "anthropic",
         "price": {"input_per_mtok": 3, "output_per_mtok": 15}},
    ]})  # fmt: skip
    Catalogue((entry,))  # gives the deployments their ids
    records: list[dict[str, Any]] = []
    settings = SimpleNamespace(logging=LoggingConfig())
    gw = SimpleNamespace(settings=settings, include_text=False, observers=[],
                         request_log=SimpleNamespace(write=records.append))  # fmt: skip
    for dep in (*entry.deployments, entry.deployments[0]):
        ctx = RequestContext("r", "chat", "/p", "POST", {}, [], {})
        ctx.model, ctx.model_entry, ctx.deployment = "acc-alias", entry, dep
        ctx.attempts, ctx.status, ctx.usage = 1, 200, Usage(1234, 567)
        account(gw, ctx)  # type: ignore[arg-type]
        record = records.pop()
        assert record["model"] == "acc-alias" and record["model_name"] == "acc-m"
        used = (record["model_used"], record["provider"], record["deployment"])
        assert used == (dep.model, dep.provider, dep.id)
        assert record["cost_usd"] == fast_round(dep.price.cost(1234, 567), 8)
    ctx = RequestContext("r", "chat", "/p", "POST", {}, [], {})  # refused before any upstream
    ctx.model, ctx.model_entry, ctx.deployment, ctx.status = "acc-m", entry, dep, 429
    account(gw, ctx)  # type: ignore[arg-type]
    record = records.pop()
    assert record["model_used"] is record["provider"] is record["deployment"] is None


def test_usage_from_shortcut_gives_what_the_reported_usage_gives() -> None:
    """``usage_from``'s shortcut for the usual usage (whole counts, nothing cached) gives the
    same ``Usage`` as ``reported_usage(data).usage()``, on every other input too."""
    from gateway.context import Usage, reported_usage, usage_from

    values = [None, 0, 7, 2000, 10**12, 10**12 + 1, -1, 2000.0, 2.5, math.nan, True, "12", {}]
    rng = random.Random(5)

    def estimate() -> Usage:
        return Usage(11, 13)

    for _ in range(20_000):
        usage: dict[str, Any] = {}
        for key in ("prompt_tokens", "completion_tokens"):
            if rng.random() < 0.9:
                usage[key] = rng.choice(values)
        if rng.random() < 0.4:
            details = {k: rng.choice(values) for k in ("cached_tokens", "cache_write_tokens",
                       "cache_write_1h_tokens") if rng.random() < 0.5}  # fmt: skip
            usage["prompt_tokens_details"] = details if rng.random() < 0.8 else rng.choice(values)
        data = {"usage": usage}
        reported = reported_usage(data)
        want = reported.usage(estimate) if reported is not None else None
        assert repr(usage_from(data, estimate)) == repr(want), data


@pytest.mark.anyio
async def test_pipeline_skips_the_hooks_a_plugin_does_not_use() -> None:
    """A plugin whose ``uses`` says its ``on_request`` has nothing to do is reached (it is in
    ``ran``, so its response hooks run) without the call; header hooks run where they apply."""
    from gateway.pipeline import Pipeline
    from gateway.plugin import Plugin

    calls: list[str] = []

    class Probe(Plugin):
        name = "probe"

        def __init__(self, label: str, request: bool, endpoints: frozenset[str]) -> None:
            super().__init__(None)
            self.label, self.request, self.endpoints = label, request, endpoints  # type: ignore[misc]

        async def on_headers(self, ctx: RequestContext) -> None:
            calls.append(f"{self.label}.headers")

        async def on_request(self, ctx: RequestContext) -> None:
            calls.append(f"{self.label}.request")

        def uses(self, hook: str) -> bool:
            return self.request if hook == "on_request" else super().uses(hook)

    both = frozenset({"chat", "embeddings"})
    a, b, c = Probe("a", True, both), Probe("b", False, both), Probe("c", True, frozenset({"chat"}))
    pipeline = Pipeline([a, b, c])
    for endpoint in ("chat", "embeddings", "chat"):
        ctx = RequestContext("r", endpoint, "/p", "POST", {}, [], {})
        ran: list[Plugin] = []
        calls.clear()
        await pipeline.run_headers(ctx)
        assert await pipeline.run_request(ctx, ran) is None
        if endpoint == "chat":
            assert ran == [a, b, c]
            assert calls == ["a.headers", "b.headers", "c.headers", "a.request", "c.request"]
        else:
            assert ran == [a, b] and calls == ["a.headers", "b.headers", "a.request"]


def test_response_hooks_are_those_of_the_plugins_reached_in_reverse() -> None:
    from gateway.pipeline import Pipeline, hooked
    from gateway.plugin import Plugin

    class Answers(Plugin):
        name = "answers"

        async def on_response(self, ctx: RequestContext) -> None:
            return None

    class Quiet(Plugin):
        name = "quiet"

    a, b, c = Answers(None), Quiet(None), Answers(None)
    pipeline = Pipeline([a, b, c])
    for _ in range(2):  # (the second time from what was kept)
        for n in range(4):
            ran = pipeline.for_endpoint("chat")[:n]
            want = list(reversed(hooked(ran, "on_response")))
            assert pipeline.response_hooks("chat", ran) == want
    assert pipeline.response_hooks("chat", [a, b, c]) == [c, a]
