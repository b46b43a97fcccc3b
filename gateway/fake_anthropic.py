"""The fake's Anthropic Messages API: ``POST /v1/messages``, plain and streamed.

It checks what the real API insists on (``x-api-key`` or a bearer token,
``anthropic-version``, ``max_tokens``, no ``system`` role inside ``messages``, alternating roles
starting with ``user``, well-formed blocks), so a translation mistake fails loudly in tests.
Content is ``"Echo: "`` + the text of the last user turn; when the request has ``tools`` and
that text contains ``call tool``, the answer is a ``tool_use`` of the first tool with input
``{"text": <last user text>}``. A ``tool_result`` in the last user turn is answered
``"Tool said: <result>"``.

Every ``x-fake-*`` behaviour works as for the OpenAI API (shared recording and counters);
injected errors use Anthropic's shape ``{"type":"error","error":{"type":..., "message":...}}``.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from aiohttp import web

from gateway.fake_upstream.state import (
    STATE,
    Behaviour,
    HeaderError,
    behaviour_for,
    counts_cancel,
    drop,
    read_json,
    serve_stream,
    stall,
    usage_with,
)

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}


def error(status: int, message: str, retry_after: str = "") -> web.Response:
    kind = _ERROR_TYPES.get(status, "api_error")
    body = {"type": "error", "error": {"type": kind, "message": message}}
    headers = {"retry-after": retry_after} if retry_after else None
    return web.Response(
        status=status, body=orjson.dumps(body), content_type="application/json", headers=headers
    )


def _sse(kind: str, data: dict[str, Any]) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


def check(request: web.Request, body: dict[str, Any]) -> str | None:
    """What the real API would reject with a 400/401, or None."""
    if not request.headers.get("x-api-key") and not request.headers.get("authorization"):
        return "401:x-api-key header is required"
    if not request.headers.get("anthropic-version"):
        return "400:anthropic-version header is required"
    if not isinstance(body.get("max_tokens"), int) or body["max_tokens"] < 1:
        return "400:max_tokens: Field required"
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return "400:messages: at least one message is required"
    prev = "assistant"
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ("user", "assistant"):
            return f"400:messages.{i}.role: Input should be 'user' or 'assistant'"
        if role == prev and i:
            return f"400:messages.{i}: roles must alternate between user and assistant"
        if i == 0 and role != "user":
            return "400:messages.0: the first message must use the user role"
        prev = role
        content = m.get("content")
        if isinstance(content, list):
            for block in content:
                if not isinstance(block, dict) or block.get("type") not in (
                    "text", "image", "tool_use", "tool_result",
                ):  # fmt: skip
                    return f"400:messages.{i}.content: unknown block type"
        elif not isinstance(content, str):
            return f"400:messages.{i}.content: must be a string or a list of blocks"
    if "temperature" in body and not 0 <= body["temperature"] <= 1:
        return "400:temperature: must be between 0 and 1"
    return None


def _last_user(messages: list[dict[str, Any]]) -> tuple[str, str | None, int]:
    """Text of the last user turn, its tool_result text if any, and the prompt's word count."""
    text, result, words = "", None, 0
    for m in messages:
        content = m["content"]
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
        texts, results = [], []
        for b in blocks:
            if b.get("type") == "text":
                texts.append(b.get("text", ""))
            elif b.get("type") == "tool_result":
                c = b.get("content")
                results.append(
                    c if isinstance(c, str) else " ".join(x.get("text", "") for x in c or ())
                )
        words += len(" ".join(texts + results).split())
        if m["role"] == "user":
            text, result = " ".join(texts), (" ".join(results) if results else None)
    return text, result, words


@counts_cancel
async def messages(request: web.Request) -> web.StreamResponse:
    body, bad = await read_json(request)
    if bad is not None:
        return error(400, "the body is not a valid JSON object")
    assert body is not None
    model = str(body.get("model", ""))
    try:
        b = behaviour_for(request, model)
    except HeaderError as e:
        return error(400, str(e))
    if b.hang_ms:
        await asyncio.sleep(b.hang_ms / 1000)
    if b.status >= 300:
        request.app[STATE].stats["errors_injected"] += 1
        message = f"injected failure {b.status} for model {model!r}"
        if b.error_code == "context_length_exceeded":  # Anthropic's words for it
            message = "prompt is too long: 250000 tokens > 200000 maximum"
        return error(b.status, message, b.retry_after)
    problem = check(request, body)
    if problem is not None:
        status, _, message = problem.partition(":")
        return error(int(status), message)
    state = request.app[STATE]
    text, result, prompt_words = _last_user(body["messages"])
    system = body.get("system")
    if isinstance(system, str):
        prompt_words += len(system.split())
    tools = body.get("tools") or []
    blocks: list[dict[str, Any]]
    if tools and result is None and "call tool" in text:
        tool_id = state.next_id("toolu")
        blocks = [
            {"type": "tool_use", "id": tool_id, "name": tools[0]["name"], "input": {"text": text}}
        ]
        stop = "tool_use"
    else:
        content = (
            b.content
            if b.content is not None
            else (f"Tool said: {result}" if result is not None else "Echo: " + text[:200])
        )
        blocks = [{"type": "text", "text": content}]
        stop = "end_turn"
    out_words = sum(len(x.get("text", "").split()) for x in blocks) or 1
    msg = {
        "id": state.next_id("msg"),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": blocks,
        "stop_reason": stop,
        "stop_sequence": None,
        "usage": usage_with({"input_tokens": prompt_words, "output_tokens": out_words}, b),
    }
    if body.get("stream"):
        return await _stream(request, b, msg)
    return web.Response(body=orjson.dumps(msg), content_type="application/json")


async def _stream(request: web.Request, b: Behaviour, msg: dict[str, Any]) -> web.StreamResponse:
    resp = web.StreamResponse(
        headers={"content-type": "text/event-stream", "cache-control": "no-cache"}
    )
    start = {**msg, "content": [], "stop_reason": None}
    # As Anthropic: message_start has the input counts, message_delta the output's.
    start["usage"] = {**msg["usage"], "output_tokens": 1}
    delay = b.delay_ms / 1000

    async def produce() -> bool:
        await resp.write(_sse("message_start", {"type": "message_start", "message": start}))
        await resp.write(_sse("ping", {"type": "ping"}))
        sent = 0
        for index, block in enumerate(msg["content"]):
            if block["type"] == "text":
                first: dict[str, Any] = {"type": "text", "text": ""}
                text, n = block["text"], b.chunks
                pieces = [
                    {
                        "type": "text_delta",
                        "text": text[i * len(text) // n : (i + 1) * len(text) // n],
                    }
                    for i in range(n)
                ]
            else:
                first = {**block, "input": {}}
                raw = orjson.dumps(block["input"]).decode()
                half = len(raw) // 2
                pieces = [
                    {"type": "input_json_delta", "partial_json": raw[:half]},
                    {"type": "input_json_delta", "partial_json": raw[half:]},
                ]
            await resp.write(_sse("content_block_start", {
                "type": "content_block_start", "index": index, "content_block": first,
            }))  # fmt: skip
            for delta in pieces:
                if sent == b.drop_after:
                    return drop(request)
                if sent == b.stall_after:
                    await stall()
                if delay:
                    await asyncio.sleep(delay)
                await resp.write(_sse("content_block_delta", {
                    "type": "content_block_delta", "index": index, "delta": delta,
                }))  # fmt: skip
                sent += 1
            await resp.write(
                _sse("content_block_stop", {"type": "content_block_stop", "index": index})
            )
        await resp.write(_sse("message_delta", {
            "type": "message_delta",
            "delta": {"stop_reason": msg["stop_reason"], "stop_sequence": None},
            "usage": {"output_tokens": msg["usage"].get("output_tokens")},
        }))  # fmt: skip
        await resp.write(_sse("message_stop", {"type": "message_stop"}))
        return True

    return await serve_stream(request, resp, produce)


def register(app: web.Application) -> None:
    app.router.add_post("/v1/messages", messages)
