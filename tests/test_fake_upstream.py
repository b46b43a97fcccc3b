"""The fake upstream: response shapes, failure injection, recording and disconnect counters."""

from __future__ import annotations

import asyncio
import base64
import socket
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import openai
import orjson
import pytest

from gateway.fake_upstream import create_app, main, start

CHAT = "/v1/chat/completions"


@asynccontextmanager
async def fake(**kwargs: Any) -> AsyncIterator[httpx.AsyncClient]:
    runner, port = await start(**kwargs)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
            yield client
    finally:
        await runner.cleanup()


def chat_body(text: str = "hello there world", **extra: Any) -> dict[str, Any]:
    return {"model": "gpt-test", "messages": [{"role": "user", "content": text}], **extra}


def sse_events(raw: str) -> list[Any]:
    """Parse an SSE body into JSON payloads, keeping ``[DONE]`` as the string."""
    assert raw.endswith("\n\n")
    out: list[Any] = []
    for block in raw.strip("\n").split("\n\n"):
        assert block.startswith("data: "), block
        data = block.removeprefix("data: ")
        out.append(data if data == "[DONE]" else orjson.loads(data))
    return out


async def stats(client: httpx.AsyncClient) -> dict[str, Any]:
    return (await client.get("/_fake/stats")).json()


async def wait_for_stat(
    client: httpx.AsyncClient, key: str, value: int, within: float
) -> dict[str, Any]:
    """Poll /_fake/stats until ``key`` reaches ``value`` or ``within`` seconds pass."""
    deadline = time.perf_counter() + within
    s = await stats(client)
    # Polling is the point: the counter lives in the server, there is no event to wait on.
    while s[key] < value and time.perf_counter() < deadline:
        await asyncio.sleep(0.02)
        s = await stats(client)
    return s


@pytest.mark.anyio
async def test_non_stream_echoes_last_user_message_with_usage() -> None:
    async with fake() as client:
        body = chat_body()
        body["messages"].insert(0, {"role": "system", "content": "be brief"})
        r = await client.post(CHAT, json=body, headers={"x-request-id": "req-42"})
    assert r.status_code == 200
    assert r.headers["x-request-id"] == "req-42"
    data = r.json()
    assert data["object"] == "chat.completion"
    assert data["id"].startswith("chatcmpl-")
    assert data["model"] == "gpt-test"
    choice = data["choices"][0]
    assert choice["message"] == {
        "role": "assistant",
        "content": "Echo: hello there world",
        "refusal": None,
    }
    assert choice["finish_reason"] == "stop"
    # Words: 2 (system) + 3 (user) in, 4 out.
    assert data["usage"] == {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}


@pytest.mark.anyio
async def test_content_parts_and_truncation_to_200_chars() -> None:
    long = "x" * 300
    parts = [{"type": "text", "text": long}, {"type": "image_url", "image_url": {"url": "u"}}]
    async with fake() as client:
        r = await client.post(
            CHAT, json={"model": "m", "messages": [{"role": "user", "content": parts}]}
        )
    assert r.json()["choices"][0]["message"]["content"] == "Echo: " + "x" * 200


@pytest.mark.anyio
async def test_stream_shape_with_usage_chunk() -> None:
    async with fake() as client:
        body = chat_body(stream=True, stream_options={"include_usage": True})
        r = await client.post(CHAT, json=body)
    assert r.headers["content-type"] == "text/event-stream"
    assert r.headers["x-request-id"]
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    role, *content, finish, usage, _ = events
    assert role["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert len(content) == 20
    assert all(e["object"] == "chat.completion.chunk" and e["model"] == "gpt-test" for e in content)
    assert len({e["id"] for e in events[:-1]}) == 1
    assert (
        "".join(e["choices"][0]["delta"]["content"] for e in content) == "Echo: hello there world"
    )
    assert finish["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "stop",
    }
    assert usage["choices"] == []
    assert usage["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}


@pytest.mark.anyio
async def test_stream_without_include_usage_has_no_usage_chunk() -> None:
    async with fake() as client:
        r = await client.post(CHAT, json=chat_body(stream=True), headers={"x-fake-chunks": "3"})
    events = sse_events(r.text)
    assert len(events) == 1 + 3 + 1 + 1
    assert all("usage" not in e for e in events[:-1])


@pytest.mark.anyio
async def test_openai_sdk_parses_every_endpoint() -> None:
    async with fake(chunks=4) as client:
        sdk = openai.AsyncOpenAI(
            base_url=str(client.base_url.join("/v1")), api_key="sk-test", max_retries=0
        )
        done = await sdk.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
        )
        assert done.choices[0].message.content == "Echo: hi"
        assert done.usage is not None and done.usage.total_tokens == 3
        stream = await sdk.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [c async for c in stream]
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Echo: hi"
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 2
        # The SDK asks for base64 embeddings by default and decodes them.
        emb = await sdk.embeddings.create(model="text-embedding-3-small", input=["a", "b c"])
        assert [len(d.embedding) for d in emb.data] == [8, 8]
        assert emb.usage.prompt_tokens == 3
        listed = await sdk.models.list()
        assert "gpt-4o-mini" in [m.id for m in listed.data]
        await sdk.close()


@pytest.mark.anyio
async def test_embeddings_are_deterministic_and_base64_matches_floats() -> None:
    async with fake() as client:
        one = (await client.post("/v1/embeddings", json={"model": "e", "input": "same"})).json()
        two = await client.post("/v1/embeddings", json={"model": "e", "input": ["same", "other"]})
        b64 = await client.post(
            "/v1/embeddings", json={"model": "e", "input": "same", "encoding_format": "base64"}
        )
    vec = one["data"][0]["embedding"]
    assert two.json()["data"][0]["embedding"] == vec
    assert two.json()["data"][1]["embedding"] != vec
    assert abs(sum(v * v for v in vec) - 1) < 1e-4
    decoded = struct.unpack("<8f", base64.b64decode(b64.json()["data"][0]["embedding"]))
    assert decoded == pytest.approx(vec, abs=1e-6)


@pytest.mark.anyio
async def test_injected_status_has_openai_error_body_and_retry_after() -> None:
    async with fake() as client:
        r = await client.post(
            CHAT, json=chat_body(), headers={"x-fake-status": "429", "x-fake-retry-after": "7"}
        )
        r503 = await client.post(
            CHAT, json=chat_body(stream=True), headers={"x-fake-status": "503"}
        )
        assert (await stats(client))["errors_injected"] == 2
    assert r.status_code == 429
    assert r.headers["retry-after"] == "7"
    assert r.json()["error"]["type"] == "rate_limit_error"
    assert r.json()["error"]["code"] == "rate_limit_exceeded"
    assert r503.status_code == 503
    assert "retry-after" not in r503.headers
    assert r503.json()["error"]["type"] == "server_error"


@pytest.mark.anyio
async def test_per_model_behaviours_and_header_override() -> None:
    async with fake(behaviours={"broken": {"status": 503, "retry_after": "2"}}) as client:
        broken = await client.post(CHAT, json={"model": "broken", "messages": []})
        fine = await client.post(CHAT, json={"model": "fine", "messages": []})
        healed = await client.post(
            CHAT, json={"model": "broken", "messages": []}, headers={"x-fake-status": "0"}
        )
        listed = (await client.get("/v1/models")).json()
    assert (broken.status_code, broken.headers["retry-after"]) == (503, "2")
    assert fine.status_code == 200
    assert healed.status_code == 200
    assert "broken" in [m["id"] for m in listed["data"]]


@pytest.mark.anyio
async def test_content_header_is_returned_exactly_in_both_modes() -> None:
    secret = "sk-live-ABCDEF0123456789"
    headers = {"x-fake-content": secret, "x-fake-chunks": "5"}
    async with fake() as client:
        plain = await client.post(CHAT, json=chat_body(), headers=headers)
        streamed = await client.post(CHAT, json=chat_body(stream=True), headers=headers)
    assert plain.json()["choices"][0]["message"]["content"] == secret
    pieces = [e["choices"][0]["delta"]["content"] for e in sse_events(streamed.text)[1:6]]
    assert "".join(pieces) == secret
    assert all(len(p) < len(secret) for p in pieces)  # the secret spans chunk boundaries


@pytest.mark.anyio
async def test_no_usage_omits_usage_everywhere() -> None:
    async with fake(no_usage=True) as client:
        plain = await client.post(CHAT, json=chat_body())
        body = chat_body(stream=True, stream_options={"include_usage": True})
        streamed = await client.post(CHAT, json=body, headers={"x-fake-chunks": "2"})
        emb = await client.post("/v1/embeddings", json={"model": "e", "input": "x"})
    assert "usage" not in plain.json()
    assert all("usage" not in e for e in sse_events(streamed.text)[:-1])
    assert "usage" not in emb.json()


@pytest.mark.anyio
async def test_hang_delays_the_first_byte_and_delay_spaces_chunks() -> None:
    async with fake() as client:
        t0 = time.perf_counter()
        r = await client.post(CHAT, json=chat_body(), headers={"x-fake-hang-ms": "300"})
        hang = time.perf_counter() - t0
        t0 = time.perf_counter()
        s = await client.post(
            CHAT,
            json=chat_body(stream=True),
            headers={"x-fake-chunks": "5", "x-fake-delay-ms": "60"},
        )
        stream = time.perf_counter() - t0
    assert r.status_code == 200 and hang >= 0.3
    assert s.status_code == 200 and stream >= 5 * 0.06
    events = sse_events(s.text)  # written event by event, same shape as the one-write burst
    assert len(events) == 1 + 5 + 1 + 1
    assert (
        "".join(e["choices"][0]["delta"]["content"] for e in events[1:6])
        == "Echo: hello there world"
    )


@pytest.mark.anyio
async def test_drop_after_cuts_the_stream_after_k_chunks() -> None:
    async with fake() as client:
        events: list[str] = []
        headers = {"x-fake-drop-after": "2", "x-fake-chunks": "10"}
        with pytest.raises(httpx.RemoteProtocolError):
            async with client.stream(
                "POST", CHAT, json=chat_body(stream=True), headers=headers
            ) as r:
                async for line in r.aiter_lines():
                    if line:
                        events.append(line)
        assert len(events) == 1 + 2  # role chunk + K content chunks, no finish, no [DONE]
        assert "[DONE]" not in events[-1]
        s = await stats(client)
        assert (s["streams_dropped"], s["streams_completed"], s["streams_in_flight"]) == (1, 0, 0)


@pytest.mark.anyio
async def test_drop_after_truncates_a_non_stream_body() -> None:
    async with fake() as client:
        with pytest.raises(httpx.RemoteProtocolError):
            await client.post(CHAT, json=chat_body(), headers={"x-fake-drop-after": "10"})


@pytest.mark.anyio
async def test_requests_are_recorded_with_repeated_headers_and_cleared() -> None:
    async with fake() as client:
        await client.post(
            CHAT,
            json=chat_body(),
            headers=[("authorization", "Bearer sk-client"), ("x-tag", "a"), ("x-tag", "b")],
        )
        await client.post(CHAT, content=b"{not json")
        recorded = (await client.get("/_fake/requests")).json()
        assert (await client.delete("/_fake/requests")).status_code == 204
        after = (await client.get("/_fake/requests")).json()
    first = recorded[0]
    assert (first["method"], first["path"]) == ("POST", CHAT)
    assert first["body"] == chat_body()
    pairs = [(k.lower(), v) for k, v in first["headers"]]
    assert ("x-tag", "a") in pairs and ("x-tag", "b") in pairs
    assert ("authorization", "Bearer sk-client") in pairs
    assert recorded[1]["body"] == "{not json"
    assert after == []


@pytest.mark.anyio
async def test_record_zero_keeps_nothing_and_log_is_bounded() -> None:
    async with fake(record=0) as client:
        await client.post(CHAT, json=chat_body())
        assert (await client.get("/_fake/requests")).json() == []
        assert (await stats(client))["requests_total"] == 1
    async with fake(record=2) as client:
        for text in ("a", "b", "c"):
            await client.post(CHAT, json=chat_body(text))
        bodies = (await client.get("/_fake/requests")).json()
    assert [b["body"]["messages"][0]["content"] for b in bodies] == ["b", "c"]


@pytest.mark.anyio
async def test_client_disconnect_counts_as_cancelled_within_a_second() -> None:
    async with fake(chunks=200, delay_ms=50) as client:
        async with client.stream("POST", CHAT, json=chat_body(stream=True)) as r:
            async for line in r.aiter_lines():
                if line:
                    break  # got the role chunk; now walk away
        s = await wait_for_stat(client, "streams_cancelled", 1, within=1.0)
        assert s["streams_cancelled"] == 1
        assert (s["streams_started"], s["streams_completed"], s["streams_in_flight"]) == (1, 0, 0)
        assert s["last_cancelled_at"] is not None
        # A client that gives up during the hang is counted too (before any stream starts).
        with pytest.raises(httpx.ReadTimeout):
            await client.post(
                CHAT, json=chat_body(), headers={"x-fake-hang-ms": "5000"}, timeout=0.2
            )
        s = await wait_for_stat(client, "requests_cancelled", 2, within=1.0)
        assert s["requests_cancelled"] == 2
        assert (await client.delete("/_fake/stats")).status_code == 204
        assert (await stats(client))["streams_started"] == 0


@pytest.mark.anyio
async def test_bad_control_header_is_a_400_naming_it() -> None:
    async with fake() as client:
        r = await client.post(CHAT, json=chat_body(), headers={"x-fake-chunks": "many"})
        zero = await client.post(CHAT, json=chat_body(), headers={"x-fake-chunks": "0"})
        arr = await client.post(CHAT, json=[1, 2])
    assert r.status_code == 400 and "x-fake-chunks" in r.json()["error"]["message"]
    assert zero.status_code == 400 and "at least 1" in zero.json()["error"]["message"]
    assert arr.status_code == 400


def test_create_app_rejects_unknown_and_invalid_settings() -> None:
    with pytest.raises(ValueError, match="unknown behaviour 'chunk'; allowed: chunks"):
        create_app(chunk=3)
    with pytest.raises(ValueError, match=r"behaviours\['m'\]: unknown behaviour 'stat'"):
        create_app(behaviours={"m": {"stat": 500}})
    with pytest.raises(ValueError, match="status must be an HTTP status"):
        create_app(status=42)
    with pytest.raises(SystemExit, match="fake_upstream: delay_ms must not be negative"):
        main(["--delay-ms", "-1"])


def test_cli_serves_with_flag_defaults() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "gateway.fake_upstream", "--port", str(port), "--chunks", "3"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                r = httpx.post(f"http://127.0.0.1:{port}{CHAT}", json=chat_body(stream=True))
                break
            except httpx.ConnectError:
                assert proc.poll() is None and time.monotonic() < deadline, "fake did not start"
                time.sleep(0.1)
        assert len(sse_events(r.text)) == 1 + 3 + 1 + 1
    finally:
        proc.terminate()
        proc.wait(5)
        assert proc.stderr is not None
        proc.stderr.close()
