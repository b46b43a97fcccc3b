"""The OpenAI endpoints of the fake: chat completions (plain and SSE), embeddings, models."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import struct
import time
from typing import Any

import orjson
from aiohttp import web

from gateway.fake_upstream.state import (
    STATE,
    Behaviour,
    counts_cancel,
    cut,
    drop,
    keepalive,
    prelude,
    read_json,
    serve_stream,
    stall,
    usage_with,
)

MODELS = ("gpt-4o-mini", "gpt-4o", "text-embedding-3-small")
EMBED_DIM = 8


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: keep the text ones
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def _words(text: str) -> int:
    return len(text.split())


def reply_text(messages: Any) -> tuple[str, int]:
    """The echo content and the prompt's word count."""
    last_user, prompt_words = "", 0
    for m in messages if isinstance(messages, list) else ():
        if isinstance(m, dict):
            text = _text(m.get("content"))
            prompt_words += _words(text)
            if m.get("role") == "user":
                last_user = text
    return "Echo: " + last_user[:200], prompt_words


@counts_cancel
async def chat_completions(request: web.Request) -> web.StreamResponse:
    body, bad = await read_json(request)
    if bad is not None:
        return bad
    assert body is not None
    model = str(body.get("model", ""))
    b, early = await prelude(request, model, stream=body.get("stream") is True)
    if early is not None:
        return early
    assert b is not None
    state = request.app[STATE]
    content, prompt_tokens = reply_text(body.get("messages"))
    if b.content is not None:
        content = b.content
    usage = usage_with({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": _words(content),
        "total_tokens": prompt_tokens + _words(content),
    }, b)  # fmt: skip
    cid, created = state.next_id("chatcmpl"), int(time.time())
    request_id = request.headers.get("x-request-id") or state.next_id("req")
    if body.get("stream"):
        opts = body.get("stream_options")
        include_usage = isinstance(opts, dict) and bool(opts.get("include_usage"))
        return await _stream(
            request, b, cid, created, model, content, usage if include_usage else None, request_id
        )
    out: dict[str, Any] = {
        "id": cid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content, "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
    }
    if b.annotations:
        out["choices"][0]["message"]["annotations"] = orjson.loads(b.annotations)
    if not b.no_usage:
        out["usage"] = usage
    data = orjson.dumps(out)
    headers = {"x-request-id": request_id}
    if b.drop_after >= 0 or b.stall_after >= 0:
        resp = web.StreamResponse(headers=headers)
        resp.content_type = "application/json"
        resp.content_length = len(data)
        await resp.prepare(request)
        if b.drop_after >= 0:
            await resp.write(data[: b.drop_after])
            cut(request)
            return resp
        await resp.write(data[: b.stall_after])
        await stall()  # (until the client goes away)
        return resp
    return web.Response(body=data, content_type="application/json", headers=headers)


async def _stream(
    request: web.Request,
    b: Behaviour,
    cid: str,
    created: int,
    model: str,
    content: str,
    usage: dict[str, Any] | None,
    request_id: str,
) -> web.StreamResponse:
    # Every chunk shares this envelope; only the delta differs, so pre-encode the two halves.
    envelope = b'data: {"id":' + orjson.dumps(cid) + b',"object":"chat.completion.chunk","created":'
    envelope += str(created).encode() + b',"model":' + orjson.dumps(model)
    envelope += b',"system_fingerprint":null,"choices":'
    head = envelope + b'[{"index":0,"delta":'
    tail = b',"logprobs":null,"finish_reason":null}]}\n\n'
    n, length = b.chunks, len(content)
    events = [head + b'{"role":"assistant","content":""}' + tail]
    for i in range(n):
        piece = content[i * length // n : (i + 1) * length // n]
        events.append(head + b'{"content":' + orjson.dumps(piece) + b"}" + tail)
    if b.annotations:  # (as OpenAI streams citations: whole, in a delta of their own)
        events.append(head + b'{"annotations":' + b.annotations.encode() + b"}" + tail)
    events.append(head + b'{},"logprobs":null,"finish_reason":"stop"}]}\n\n')
    if usage is not None and not b.no_usage:
        events.append(envelope + b'[],"usage":' + orjson.dumps(usage) + b"}\n\n")
    events.append(b"data: [DONE]\n\n")
    resp = web.StreamResponse(
        headers={
            "content-type": "text/event-stream",
            "cache-control": "no-cache",
            "x-request-id": request_id,
        }
    )
    delay = b.delay_ms / 1000

    error = b'data: {"error":{"message":"injected stream error for model ' + model.encode()
    error += b'","type":"server_error","param":null,"code":"internal_error"}}\n\n'

    async def produce() -> bool:
        if b.keepalive_ms:
            await keepalive(resp, b)
        if not delay and b.drop_after < 0 and b.stall_after < 0 and b.error_event_after < 0:
            # A burst anyway: one write instead of ~24 keeps the fake cheap as a bench target.
            await resp.write(b"".join(events))
            return True
        for i, event in enumerate(events):
            if b.drop_after >= 0 and i == b.drop_after + 1:  # events[0]: the role chunk
                return drop(request)
            if b.stall_after >= 0 and i == b.stall_after + 1:
                await stall()
            if b.error_event_after >= 0 and i == b.error_event_after + 1:
                await resp.write(error + b"data: [DONE]\n\n")  # (as vLLM ends it)
                return True
            if delay and 1 <= i <= n:
                await asyncio.sleep(delay)
            await resp.write(event)
        return True

    return await serve_stream(request, resp, produce)


def _vector(item: Any) -> list[float]:
    digest = hashlib.sha256(orjson.dumps(item)).digest()
    raw = [(x - 127.5) / 127.5 for x in digest[:EMBED_DIM]]
    norm = sum(v * v for v in raw) ** 0.5 or 1.0
    return [round(v / norm, 6) for v in raw]


@counts_cancel
async def embeddings(request: web.Request) -> web.Response:
    body, bad = await read_json(request)
    if bad is not None:
        return bad
    assert body is not None
    model = str(body.get("model", ""))
    b, early = await prelude(request, model)
    if early is not None:
        return early
    assert b is not None
    inputs = body.get("input")
    # A string, or a list of strings / token ids / token-id lists: one vector per list item,
    # except a flat list of ints, which is one tokenised input.
    if not isinstance(inputs, list) or (inputs and all(isinstance(x, int) for x in inputs)):
        inputs = [inputs]
    b64 = body.get("encoding_format") == "base64"  # what the openai SDK asks for by default
    data = []
    for i, item in enumerate(inputs):
        vec = _vector(item)
        emb: Any = base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode() if b64 else vec
        data.append({"object": "embedding", "index": i, "embedding": emb})
    tokens = sum(
        _words(x) if isinstance(x, str) else len(x) if isinstance(x, list) else 1 for x in inputs
    )
    out: dict[str, Any] = {"object": "list", "data": data, "model": model}
    if not b.no_usage:
        out["usage"] = {"prompt_tokens": tokens, "total_tokens": tokens}
    return web.Response(body=orjson.dumps(out), content_type="application/json")


async def models(request: web.Request) -> web.Response:
    names = dict.fromkeys((*MODELS, *request.app[STATE].behaviours))
    data = [{"id": m, "object": "model", "created": 0, "owned_by": "fake"} for m in names]
    return web.Response(
        body=orjson.dumps({"object": "list", "data": data}), content_type="application/json"
    )
