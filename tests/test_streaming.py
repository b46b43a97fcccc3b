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


def test_upstream_silent_mid_stream_for_the_read_timeout_ends_the_stream() -> None:
    """``upstream.read_timeout_s`` bounds the silence between two reads of a stream: the role
    chunk and the first text come at once, then nothing, the timeout is 0.4 s. (Silence after
    the role chunk alone is a failure before the answer began: see test_route_failover.)"""
    upstream = {"read_timeout_s": 0.4, "first_byte_timeout_s": 5}
    with running_gateway(fake={"chunks": 3, "stall_after": 1}, upstream=upstream) as gw:
        with httpx.Client(timeout=10) as client:
            t0 = time.perf_counter()
            r = client.post(f"{gw.url}/v1/chat/completions", json=BODY)
            took = time.perf_counter() - t0
        assert r.status_code == 200  # the status line was already sent
        evs = events(r.text.splitlines())
        assert isinstance(evs[-1], dict) and evs[-1]["error"]["type"] == "timeout", evs[-1]
        assert "[DONE]" not in evs
        # Never before the timeout; at most a quarter of it later (plus a busy machine's slack).
        assert 0.4 <= took < 1.5, took
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not gw.upstream.stats().get("streams_cancelled"):
            time.sleep(0.05)
        assert gw.upstream.stats()["streams_cancelled"] == 1  # the connection was dropped


def test_upstream_stalling_after_some_events_is_timed_out_too() -> None:
    """The same once text has flowed: 6 chunks 50 ms apart, then nothing on an open connection
    (after a stream's first reads the gateway, not aiohttp, keeps this timeout)."""
    upstream = {"read_timeout_s": 0.4, "first_byte_timeout_s": 5}
    fake = {"chunks": 10, "delay_ms": 50, "stall_after": 6}
    with running_gateway(fake=fake, upstream=upstream) as gw:
        with httpx.Client(timeout=10) as client:
            t0 = time.perf_counter()
            r = client.post(f"{gw.url}/v1/chat/completions", json=BODY)
            took = time.perf_counter() - t0
        evs = events(r.text.splitlines())
        texts = [e for e in evs if isinstance(e, dict) and e.get("choices")]
        assert texts and isinstance(evs[-1], dict) and evs[-1]["error"]["type"] == "timeout"
        # The last text came ~0.3 s in: the timeout ends the stream 0.4-0.5 s after it.
        assert 0.7 <= took < 1.9, took
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not gw.upstream.stats().get("streams_cancelled"):
            time.sleep(0.05)
        assert gw.upstream.stats()["streams_cancelled"] == 1


def test_pauses_shorter_than_the_read_timeout_do_not_end_a_stream() -> None:
    upstream = {"read_timeout_s": 0.5, "first_byte_timeout_s": 5}
    with running_gateway(fake={"chunks": 4, "delay_ms": 300}, upstream=upstream) as gw:
        with httpx.Client(timeout=10) as client:
            r = client.post(f"{gw.url}/v1/chat/completions", json=BODY)
        evs = events(r.text.splitlines())
        assert evs[-1] == "[DONE]", evs[-3:]
        assert not any(isinstance(e, dict) and "error" in e for e in evs)


@pytest.mark.parametrize("stream", [False, True])
def test_client_leaving_before_the_first_byte_cancels_the_upstream(stream: bool) -> None:
    """The upstream is slow to answer (hang before its headers): a client that gives up cancels
    the upstream call at once, and the log says so (status 499: nothing was sent)."""
    with running_gateway(fake={"hang_ms": 3000}) as gw:
        records: list[dict[str, Any]] = []
        gw.gateway.observers.append(lambda ctx, record: records.append(record))
        with httpx.Client(timeout=0.4) as client, pytest.raises(httpx.ReadTimeout):
            client.post(f"{gw.url}/v1/chat/completions", json={**BODY, "stream": stream})
        left_at = time.time()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not (
            gw.upstream.stats().get("requests_cancelled") and records
        ):
            time.sleep(0.05)
        stats = gw.upstream.stats()
        assert stats["requests_cancelled"] == 1  # the upstream connection was dropped
        assert stats["last_cancelled_at"] - left_at < 1.0
        assert records[0]["client_disconnected"] is True and records[0]["status"] == 499
        assert "cost_usd" not in records[0] or records[0]["cost_usd"] == 0


def test_text_the_output_guard_holds_goes_out_before_an_upstream_failure() -> None:
    """The guard holds the last word until it is whole; a cut stream used to lose it: the
    client got 'one two thr' then the error, though the upstream had sent all of it."""
    guard = {"name": "guard", "config": {"semantic": {"enabled": False}}}
    fake = {"chunks": 4, "drop_after": 4, "content": "one two three four"}
    with running_gateway(pipeline=[guard], fake=fake) as gw:
        with httpx.Client(timeout=10) as client:
            r = client.post(f"{gw.url}/v1/chat/completions", json=BODY)
        evs = events(r.text.splitlines())
        text = "".join(
            (c.get("delta") or {}).get("content") or ""
            for e in evs[:-1] if isinstance(e, dict) for c in e.get("choices") or ()
        )  # fmt: skip
        assert text == "one two three four"
        assert isinstance(evs[-1], dict) and evs[-1]["error"]["type"] == "upstream_error"


@pytest.mark.anyio
@pytest.mark.parametrize("hooked", [False, True])
async def test_nothing_after_done_reaches_the_client(hooked: bool) -> None:
    """An upstream that went on after [DONE] had its text spliced into the answer."""
    from gateway.context import RequestContext
    from gateway.stream import _Relay
    from plugins.guard import GuardConfig, GuardPlugin

    def ev(text: str) -> bytes:
        chunk = {
            "id": "c",
            "object": "chat.completion.chunk",
            "created": 0,
            "model": "m",
            "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}],
        }
        return b"data: " + json.dumps(chunk).encode() + b"\n\n"

    hooks = [GuardPlugin(GuardConfig.model_validate({"semantic": {"enabled": False}}))]
    ctx = RequestContext("r", "chat", "/v1/chat/completions", "POST", {}, [], {}, stream=True)
    relay = _Relay(ctx, hooks if hooked else [], False)
    out = await relay.feed(ev("a") + b"data: [DONE]\n\n" + ev("SAME-READ"))
    out += await relay.feed(ev("LATER") + b"data: [DONE]\n\n")
    out += await relay.end()
    assert b"SAME-READ" not in out and b"LATER" not in out
    assert out.endswith(b"data: [DONE]\n\n") and out.count(b"[DONE]") == 1


@pytest.mark.anyio
async def test_the_read_watch_does_not_blame_the_upstream_for_a_slow_client() -> None:
    """Reading paused (the gateway's buffer full: the client reads slowly) looked like a
    stalled upstream: the stream was cut as an upstream timeout and the breaker counted it."""
    import asyncio
    from types import SimpleNamespace

    from gateway.providers.openai import _ReadWatch

    protocol = SimpleNamespace(_reading_paused=True)
    errors: list[BaseException] = []
    content = SimpleNamespace(total_bytes=10, _protocol=protocol, set_exception=errors.append)
    watch = _ReadWatch(content, 0.2)  # type: ignore[arg-type]
    try:
        await asyncio.sleep(0.5)
        assert errors == []  # paused: not the upstream's silence
        protocol._reading_paused = False
        await asyncio.sleep(0.5)
        assert len(errors) == 1  # reading, and nothing for the whole timeout: a stall
    finally:
        watch.stop()
