"""Streaming relay: incremental delivery, disconnects, failures after the first byte."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import openai
import pytest

from tests.helpers import running_gateway

MSG = [{"role": "user", "content": "hello world"}]
BODY = {"model": "demo", "messages": MSG, "stream": True}


def events(lines: list[str]) -> list[Any]:
    out = []
    for line in lines:
        if line.startswith("data: "):
            data = line[6:]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def test_first_chunk_arrives_while_upstream_is_still_sleeping() -> None:
    # 4 chunks, 600 ms apart: the whole stream takes >= 1.8 s upstream.
    with running_gateway(fake={"chunks": 4, "delay_ms": 600}) as gw:
        client = gw.openai()
        t0 = time.perf_counter()
        stream = client.chat.completions.create(**BODY)
        arrivals = []
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                arrivals.append(time.perf_counter() - t0)
        total = time.perf_counter() - t0
    assert total >= 1.7
    assert arrivals[0] < 0.9, arrivals  # long before the upstream finished
    assert arrivals[-1] - arrivals[0] >= 1.1  # spread out, not delivered at once


def test_client_disconnect_closes_the_upstream_within_a_second() -> None:
    with running_gateway(fake={"chunks": 200, "delay_ms": 50}) as gw:
        with httpx.Client(timeout=10) as client:
            with client.stream("POST", f"{gw.url}/v1/chat/completions", json=BODY) as r:
                assert r.status_code == 200
                it = r.iter_lines()
                got = [next(it) for _ in range(3)]
                assert any(line.startswith("data: ") for line in got)
            # leaving the block closes the connection mid-stream
            closed_at = time.time()
        # The fake stamps the moment it saw its side of the connection go (same clock); poll
        # generously for the stamp so a busy machine cannot fail the test by polling late.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not gw.upstream.stats().get("last_cancelled_at"):
            time.sleep(0.05)
        stats = gw.upstream.stats()
        assert stats["streams_cancelled"] == 1
        assert stats["last_cancelled_at"] - closed_at < 1.0
        assert stats.get("streams_completed", 0) == 0
        # the gateway is fine afterwards
        r2 = gw.openai().chat.completions.create(model="demo", messages=MSG)
        assert r2.choices[0].message.content


def test_upstream_drop_after_first_byte_becomes_a_final_sse_error_event() -> None:
    with running_gateway(fake={"chunks": 10, "drop_after": 2}) as gw:
        with httpx.Client(timeout=10) as client:
            r = client.post(f"{gw.url}/v1/chat/completions", json=BODY)
        assert r.status_code == 200  # the status line was already sent
        evs = events(r.text.splitlines())
        assert "[DONE]" not in evs
        assert isinstance(evs[-1], dict) and evs[-1]["error"]["type"] == "upstream_error"
        assert any(isinstance(e, dict) and e.get("choices") for e in evs[:-1])
        # and the SDK raises instead of silently returning a truncated answer
        with pytest.raises(openai.APIError):
            for _ in gw.openai().chat.completions.create(**BODY):
                pass


def test_stream_usage_is_accounted_even_when_upstream_sends_none() -> None:
    with running_gateway(fake={"chunks": 3, "no_usage": True}) as gw:
        chunks = list(gw.openai().chat.completions.create(
            **BODY, stream_options={"include_usage": True}))  # fmt: skip
        assert all(c.choices for c in chunks)  # nothing invented for the client
        text = httpx.get(f"{gw.url}/metrics").text
        line = next(
            ln for ln in text.splitlines()
            if ln.startswith('gateway_tokens_total{model="demo",type="completion"}')
        )  # fmt: skip
        assert float(line.split()[-1]) > 0


@pytest.mark.anyio
async def test_relay_normalises_crlf_framing_and_events_split_across_reads() -> None:
    # Some servers frame SSE with CRLF, and TCP reads split events anywhere.
    from gateway.context import RequestContext
    from gateway.stream import _Relay

    sent: list[bytes] = []
    ctx = RequestContext("r", "chat", "/v1/chat/completions", "POST", {}, [], {})
    relay = _Relay(ctx, [], False)
    wire = (
        b'data: {"choices":[{"delta":{"content":"a"}}]}\r\n\r\n'
        b'data: {"choices":[],"usage":{"prompt_tokens":4,"completion_tokens":2}}\r\n\r\n'
        b"data: [DONE]\r\n\r\n"
    )
    for i in range(0, len(wire), 7):
        sent.append(await relay.feed(wire[i : i + 7]))
    sent.append(await relay.end())
    out = b"".join(sent)
    assert out == b'data: {"choices":[{"delta":{"content":"a"}}]}\n\ndata: [DONE]\n\n'
    assert relay.usage is not None and relay.usage.prompt_tokens == 4


@pytest.mark.anyio
@pytest.mark.parametrize("wants_usage", [False, True])
async def test_relay_drops_only_the_usage_event_and_passes_the_other_bytes_as_they_came(
    wants_usage: bool,
) -> None:
    # One read holding content, a usage-only chunk, a chunk with both choices and usage (never
    # dropped), more content and [DONE]: only the usage-only event may go, unless asked for.
    from gateway.context import RequestContext
    from gateway.stream import _Relay

    a = b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n'
    usage = b'data: {"choices":[],"usage": {"prompt_tokens":4,"completion_tokens":2}}\n\n'
    both = b'data: {"choices":[{"delta":{}}],"usage":{"prompt_tokens":9,"completion_tokens":1}}\n\n'
    b = b'data: {"choices":[{"delta":{"content":"b"}}]}\n\n'
    ctx = RequestContext("r", "chat", "/v1/chat/completions", "POST", {}, [], {})
    relay = _Relay(ctx, [], wants_usage)
    out = await relay.feed(a + usage + both + b + b"data: [DONE]\n\n") + await relay.end()
    assert out == a + (usage if wants_usage else b"") + both + b + b"data: [DONE]\n\n"
    assert relay.usage is not None and relay.usage.prompt_tokens == 9  # the last one counts
