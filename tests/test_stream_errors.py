"""An upstream that ends a stream with an error event, end to end: the real gateway in front of a
small upstream that answers the way vLLM (OpenAI-compatible) and Anthropic do when a stream
fails after its first words.

What must hold, with and without the output guard: the client gets the text that came before
the error, then the error as the last event and no ``[DONE]`` (so the openai SDK raises); the
request is counted as the deployment's failure (``gateway_upstream_errors_total``, the route
plugin's circuit breaker) and logged with its ``error_type``."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from aiohttp import web

from tests.helpers import LoopThread, running_gateway

BODY = {"model": "vllm", "messages": [{"role": "user", "content": "hi"}], "stream": True}
GUARD = {"name": "guard", "config": {"semantic": {"enabled": False}}}
ROUTE = {"name": "route", "config": {"breaker": {"failures": 2, "cooldown_s": 60}}}


def _chunk(text: str) -> bytes:
    choice = {"index": 0, "delta": {"content": text}, "finish_reason": None}
    obj = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "choices": [choice]}
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def _anthropic(kind: str, data: dict[str, Any]) -> bytes:
    return f"event: {kind}\ndata: {json.dumps(data)}\n\n".encode()


async def _vllm(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await resp.prepare(request)
    await resp.write(_chunk("partial "))
    await resp.write(_chunk("answer"))
    # vLLM's engine failing mid-answer: an error object as an event, then [DONE].
    await resp.write(b'data: {"error": {"message": "engine died", "type": "server_error"}}\n\n')
    await resp.write(_chunk("never"))
    await resp.write(b"data: [DONE]\n\n")
    return resp


async def _messages(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await resp.prepare(request)
    usage = {"input_tokens": 3, "output_tokens": 1}
    start = {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude",
             "content": [], "stop_reason": None, "usage": usage}  # fmt: skip
    await resp.write(_anthropic("message_start", {"type": "message_start", "message": start}))
    block = {
        "type": "content_block_start",
        "index": 0,
        "content_block": {"type": "text", "text": ""},
    }
    await resp.write(_anthropic("content_block_start", block))
    for text in ("partial ", "answer"):
        delta = {"type": "text_delta", "text": text}
        await resp.write(_anthropic("content_block_delta", {
            "type": "content_block_delta", "index": 0, "delta": delta}))  # fmt: skip
    overloaded = {"type": "overloaded_error", "message": "Overloaded"}
    await resp.write(_anthropic("error", {"type": "error", "error": overloaded}))
    return resp


async def _crlf(request: web.Request) -> web.StreamResponse:
    # A healthy stream framed with CRLF line endings (allowed by the SSE spec).
    resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await resp.prepare(request)
    role = {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
    events = [{"id": "c1", "object": "chat.completion.chunk", "choices": [role]}]
    events += [json.loads(_chunk(t)[6:]) for t in ("Hello ", "there")]
    for obj in events:
        await resp.write(b"data: " + json.dumps(obj).encode() + b"\r\n\r\n")
    await resp.write(b"data: [DONE]\r\n\r\n")
    return resp


@contextlib.contextmanager
def failing_upstream() -> Iterator[str]:
    app = web.Application()
    app.router.add_post("/v1/chat/completions", _vllm)
    app.router.add_post("/v1/messages", _messages)
    app.router.add_post("/crlf/v1/chat/completions", _crlf)
    thread = LoopThread()

    async def start() -> tuple[web.AppRunner, int]:
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return runner, site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    runner, port = thread.run(start())
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        thread.run(runner.cleanup())
        thread.stop()


def _config(url: str, pipeline: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "models": [
            {
                "name": "vllm",
                "deployments": [
                    {
                        "id": "vllm-1",
                        "provider": "openai",
                        "model": "m",
                        "base_url": f"{url}/v1",
                        "api_key": "sk-provider-CANARY-0123",
                    }
                ],
            },
            {
                "name": "claude",
                "deployments": [
                    {
                        "id": "claude-1",
                        "provider": "anthropic",
                        "model": "claude",
                        "base_url": f"{url}/v1",
                        "api_key": "sk-ant-CANARY-0123",
                    }
                ],
            },
        ],
        "pipeline": pipeline,
        "logging": {"request_log": "none"},
    }


def _with_crlf(config: dict[str, Any], url: str) -> dict[str, Any]:
    dep = {"id": "crlf-1", "provider": "openai", "model": "m", "base_url": f"{url}/crlf/v1"}
    config["models"].append({"name": "crlf", "deployments": [dep]})
    return config


def _events(text: str) -> list[Any]:
    out: list[Any] = []
    for line in text.splitlines():
        if line.startswith("data: "):
            data = line[6:]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def _text(events: list[Any]) -> str:
    return "".join(
        (c.get("delta") or {}).get("content") or ""
        for e in events
        if isinstance(e, dict)
        for c in e.get("choices") or ()
    )


def _errors(url: str, deployment: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith("gateway_upstream_errors_total{") and f'"{deployment}"' in line:
            return float(line.split()[-1])
    return 0.0


@pytest.mark.parametrize("pipeline", [[], [GUARD]], ids=["fast relay", "output guard"])
@pytest.mark.parametrize("model", ["vllm", "claude"])
def test_an_error_event_after_output_ends_the_stream_after_its_text(
    pipeline: list[dict[str, Any]], model: str
) -> None:
    deployment = f"{model}-1"
    with failing_upstream() as url, running_gateway(_config(url, pipeline)) as gw:
        before = _errors(gw.url, deployment)
        with httpx.Client(timeout=10) as client:
            r = client.post(f"{gw.url}/v1/chat/completions", json={**BODY, "model": model})
        evs = _events(r.text)
        assert "[DONE]" not in evs
        assert isinstance(evs[-1], dict) and "error" in evs[-1], evs[-1]
        assert _text(evs[:-1]) == "partial answer"  # (the guard's held last word included)
        assert "never" not in r.text
        assert _errors(gw.url, deployment) == before + 1
        # The SDK raises rather than return a truncated answer as if complete.
        got = []
        with pytest.raises(openai.APIError):
            for chunk in gw.openai().chat.completions.create(**{**BODY, "model": model}):
                got.extend(c.delta.content or "" for c in chunk.choices)
        assert "".join(got) == "partial answer"


def test_error_events_open_the_circuit_breaker() -> None:
    with failing_upstream() as url, running_gateway(_config(url, [ROUTE])) as gw:
        with httpx.Client(timeout=10) as client:
            for _ in range(2):
                client.post(f"{gw.url}/v1/chat/completions", json=BODY)
            r = client.post(f"{gw.url}/v1/chat/completions", json=BODY)
        # Two failed streams: the only deployment's breaker is open, so the third request is
        # refused before it reaches the upstream.
        assert r.status_code == 503, r.text
        assert r.json()["error"]["type"]


@pytest.mark.parametrize("pipeline", [[], [GUARD]], ids=["fast relay", "output guard"])
def test_a_crlf_framed_stream_is_relayed(pipeline: list[dict[str, Any]]) -> None:
    """The check that a stream has begun (before anything goes to the client) read only LF
    framing: a short CRLF-framed stream failed as if the upstream had sent nothing."""
    with failing_upstream() as url, running_gateway(_with_crlf(_config(url, pipeline), url)) as gw:
        chunks = gw.openai().chat.completions.create(**{**BODY, "model": "crlf"})
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
            "Hello there"
        )
