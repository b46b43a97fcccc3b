"""OpenAI chat completions ↔ Anthropic Messages API, as pure functions (golden-tested).

* :func:`to_anthropic` turns an OpenAI request body into a Messages API body;
* :func:`from_anthropic` turns a Messages API answer into a ``chat.completion``;
* :class:`~gateway.providers.anthropic_stream.StreamTranslator` (its own module) turns
  Anthropic SSE events into ``chat.completion.chunk`` events.

What has no Anthropic equivalent is either dropped when it only tunes sampling (``seed``,
``frequency_penalty``, ``logit_bias`` ...) or refused with
:class:`~gateway.errors.UnsupportedByDeploymentError` when ignoring it would change the answer
(``n > 1``, ``logprobs``, audio output, custom tools, ``allowed_tools``): the next deployment of
the plan is tried, and the client gets a 400 only when none can serve it.
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from gateway.context import token_count
from gateway.errors import (
    InvalidRequestError,
    UnsupportedByDeploymentError,
    UpstreamError,
)
from gateway.providers.anthropic_errors import ERROR_STATUS as ERROR_STATUS
from gateway.providers.anthropic_errors import error_from_body as error_from_body

STOP_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "tool_use": "tool_calls",
    "pause_turn": "stop",
    "refusal": "content_filter",
    # The answer was cut where the context window ended (newer models stop so by default).
    "model_context_window_exceeded": "length",
}

#: Image types the Messages API takes (``jpg`` is what many clients write for ``jpeg``).
_IMAGE_TYPES = {"image/jpeg": "image/jpeg", "image/jpg": "image/jpeg", "image/png": "image/png",
                "image/gif": "image/gif", "image/webp": "image/webp"}  # fmt: skip

_JSON_INSTRUCTION = "Respond only with a single valid JSON object and nothing else."

#: The user turn put before a history that opens with the assistant (a greeting-first chat,
#: which OpenAI takes): the Messages API wants a user turn first, and a non-empty text.
_OPENING_USER_TEXT = "."


def _text_of(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"
        )
    if content is None:
        return ""
    raise InvalidRequestError(f"'{where}.content' must be a string or a list", param=where)


def _image_block(url: str, where: str) -> dict[str, Any]:
    if url.startswith("data:"):
        header, sep, data = url.partition(",")
        media_type = _IMAGE_TYPES.get(header[5:].split(";", 1)[0].lower(), "")
        if not sep or ";base64" not in header or not media_type:
            raise InvalidRequestError(
                "image data URLs must look like data:image/<type>;base64,<data> with type "
                "jpeg, png, gif or webp",
                param=where,
            )
        return {
            "type": "image",
            "source": {"type": "base64", "media_type": media_type, "data": data},
        }
    if url.startswith(("http://", "https://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    raise InvalidRequestError("image URLs must be data: or http(s): URLs", param=where)


def _user_blocks(content: Any, where: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    blocks: list[dict[str, Any]] = []
    for j, part in enumerate(content or ()):
        kind = part.get("type")
        if kind == "text":
            if part.get("text"):
                blocks.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            img = part.get("image_url") or {}
            blocks.append(_image_block(str(img.get("url", "")), f"{where}.content[{j}]"))
        else:
            raise UnsupportedByDeploymentError(
                f"content part type {kind!r} is not supported by this model",
                param=f"{where}.content[{j}]",
            )
    return blocks


def _assistant_blocks(msg: dict[str, Any], where: str) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    text = _text_of(msg.get("content"), where)
    if text:
        blocks.append({"type": "text", "text": text})
    for j, call in enumerate(msg.get("tool_calls") or ()):
        if call.get("type", "function") != "function":
            # A custom tool's call (free-text input): no tool_use block can carry it.
            raise UnsupportedByDeploymentError(
                f"tool calls of type {call.get('type')!r} are not supported by this model",
                param=f"{where}.tool_calls[{j}]",
            )
        fn = call.get("function") or {}
        try:
            args = orjson.loads(fn.get("arguments") or "{}")
        except orjson.JSONDecodeError:
            args = None
        if not isinstance(args, dict):
            raise InvalidRequestError(
                "tool call arguments must be a JSON object",
                param=f"{where}.tool_calls[{j}].function.arguments",
            )
        blocks.append(
            {
                "type": "tool_use",
                "id": call.get("id", ""),
                "name": fn.get("name", ""),
                "input": args,
            }
        )
    return blocks


def _messages(
    messages: list[dict[str, Any]],
) -> tuple[list[str], list[dict[str, Any]]]:
    """System texts and Anthropic messages, consecutive same-role turns merged."""
    system: list[str] = []
    out: list[dict[str, Any]] = []
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        role = msg.get("role")
        if role in ("system", "developer"):
            text = _text_of(msg.get("content"), where)
            if text:
                system.append(text)
            continue
        if role == "user":
            turn, blocks = "user", _user_blocks(msg.get("content"), where)
        elif role == "assistant":
            turn, blocks = "assistant", _assistant_blocks(msg, where)
        elif role == "tool":
            turn = "user"
            blocks = [
                {
                    "type": "tool_result",
                    "tool_use_id": msg.get("tool_call_id", ""),
                    "content": _text_of(msg.get("content"), where),
                }
            ]
        else:
            raise UnsupportedByDeploymentError(
                f"role {role!r} is not supported by this model", param=f"{where}.role"
            )
        if not blocks:
            continue
        if out and out[-1]["role"] == turn:
            out[-1]["content"].extend(blocks)
        else:
            out.append({"role": turn, "content": blocks})
    return system, out


def _tools(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for i, t in enumerate(tools):
        if t.get("type", "function") != "function":
            # A custom tool (free-text input, maybe a grammar): Anthropic tools take JSON only.
            raise UnsupportedByDeploymentError(
                f"tools of type {t.get('type')!r} are not supported by this model",
                param=f"tools[{i}]",
            )
        fn = t.get("function") or {}
        tool: dict[str, Any] = {"name": fn.get("name", "")}
        if fn.get("description"):
            tool["description"] = fn["description"]
        tool["input_schema"] = fn.get("parameters") or {"type": "object", "properties": {}}
        out.append(tool)
    return out


def _tool_choice(choice: Any, parallel: Any) -> dict[str, Any] | None:
    out: dict[str, Any] | None
    if choice is None:
        out = {"type": "auto"} if parallel is False else None
    elif choice == "auto":
        out = {"type": "auto"}
    elif choice == "required":
        out = {"type": "any"}
    elif choice == "none":
        out = {"type": "none"}
    elif isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        out = {"type": "tool", "name": choice["function"].get("name", "")}
    elif isinstance(choice, dict) and choice.get("type") not in (None, "function"):
        # allowed_tools, a named custom tool ...: valid OpenAI shapes with no equivalent here.
        raise UnsupportedByDeploymentError(
            f"tool_choice of type {choice['type']!r} is not supported by this model",
            param="tool_choice",
        )
    else:
        raise InvalidRequestError("unsupported tool_choice", param="tool_choice")
    if out is not None and parallel is False and out["type"] != "none":
        out["disable_parallel_tool_use"] = True
    return out


def max_tokens(asked: int, max_output_tokens: int) -> int:
    """The Messages API's ``max_tokens`` (it needs one): the client's, capped by the
    deployment's ``max_output_tokens``, which is also the default."""
    return min(asked, max_output_tokens) if asked else max_output_tokens


def to_anthropic(body: dict[str, Any], model: str, max_output_tokens: int) -> dict[str, Any]:
    """The Messages API body for an OpenAI chat request (``body`` is not modified)."""
    if (body.get("n") or 1) > 1:
        raise UnsupportedByDeploymentError("n > 1 is not supported by this model", param="n")
    if body.get("logprobs"):
        raise UnsupportedByDeploymentError(
            "logprobs are not supported by this model", param="logprobs"
        )
    if body.get("functions") or body.get("function_call"):
        # (the legacy form of tools: dropping it would answer in text where a call was asked)
        field = "functions" if body.get("functions") else "function_call"
        raise UnsupportedByDeploymentError(
            f"'{field}' is not supported by this model; use 'tools' and 'tool_choice'",
            param=field,
        )
    modalities = body.get("modalities")
    if isinstance(modalities, list) and "audio" in modalities:
        raise UnsupportedByDeploymentError(
            "audio output is not supported by this model", param="modalities"
        )
    if body.get("audio") is not None:
        raise UnsupportedByDeploymentError(
            "audio output is not supported by this model", param="audio"
        )
    if body.get("web_search_options") is not None:
        # (dropping it would answer without the search that was asked for)
        raise UnsupportedByDeploymentError(
            "web_search_options is not supported by this model", param="web_search_options"
        )
    system, messages = _messages(body.get("messages") or [])
    if not messages and system:
        # Only system/developer text (OpenAI answers it): the Messages API needs one turn.
        messages = [{"role": "user", "content": [{"type": "text", "text": system.pop()}]}]
    if not messages:
        raise InvalidRequestError(
            "'messages' must hold at least one message with content", param="messages"
        )
    if messages[0]["role"] == "assistant":
        # A history opening with the assistant (OpenAI answers it): the Messages API wants a
        # user turn first.
        opening = {"type": "text", "text": _OPENING_USER_TEXT}
        messages.insert(0, {"role": "user", "content": [opening]})
    fmt = body.get("response_format") or {}
    if fmt.get("type") == "json_object":
        system.append(_JSON_INSTRUCTION)
    elif fmt.get("type") == "json_schema":
        schema = (fmt.get("json_schema") or {}).get("schema") or {}
        system.append(
            _JSON_INSTRUCTION + " It must follow this JSON schema: " + orjson.dumps(schema).decode()
        )
    asked = body.get("max_completion_tokens") or body.get("max_tokens")
    out: dict[str, Any] = {
        "model": model,
        "max_tokens": max_tokens(int(asked or 0), max_output_tokens),
        "messages": messages,
    }
    if system:
        out["system"] = "\n\n".join(system)
    stop = body.get("stop")
    # Anthropic refuses a stop sequence of only whitespace ("\n" is a common OpenAI one).
    stops = [x for x in ([stop] if isinstance(stop, str) else stop or ()) if x and x.strip()]
    if stops:
        out["stop_sequences"] = stops
    if body.get("temperature") is not None:
        # OpenAI's range is 0-2, Anthropic's 0-1: clamp rather than fail a request that a
        # fallback chain moved here from an OpenAI deployment.
        out["temperature"] = min(float(body["temperature"]), 1.0)
    elif body.get("top_p") is not None:
        # Only one of the two: current Claude models refuse both in one request.
        out["top_p"] = body["top_p"]
    if body.get("tools"):
        out["tools"] = _tools(body["tools"])
    choice = _tool_choice(body.get("tool_choice"), body.get("parallel_tool_calls"))
    if choice is not None and body.get("tools"):
        out["tool_choice"] = choice
    if isinstance(body.get("user"), str) and body["user"]:
        out["metadata"] = {"user_id": body["user"]}
    if body.get("stream"):
        out["stream"] = True
    return out


def usage_of(usage: dict[str, Any] | None) -> dict[str, Any]:
    """Anthropic's usage in OpenAI's shape: ``prompt_tokens`` counts every input token, those
    read from the prompt cache (``cached_tokens``, as OpenAI reports its cache hits) and those
    written to it (``cache_write_tokens``: OpenAI has no such count; ``cache_write_1h_tokens``
    those of them in the one-hour cache, priced higher) included. A count that is missing or
    no whole number is left out, for the gateway to estimate, never taken as 0."""
    u = usage if isinstance(usage, dict) else {}
    read = token_count(u.get("cache_read_input_tokens")) or 0
    write = token_count(u.get("cache_creation_input_tokens")) or 0
    fresh = token_count(u.get("input_tokens"))
    completion = token_count(u.get("output_tokens"))
    out: dict[str, Any] = {}
    if fresh is not None:
        out["prompt_tokens"] = fresh + read + write
    if completion is not None:
        out["completion_tokens"] = completion
    if fresh is not None and completion is not None:
        out["total_tokens"] = out["prompt_tokens"] + completion
    if read or write:
        details = out["prompt_tokens_details"] = {"cached_tokens": read}
        if write:
            details["cache_write_tokens"] = write
            ttl = u.get("cache_creation")
            hour = token_count(ttl.get("ephemeral_1h_input_tokens")) if type(ttl) is dict else 0
            if hour:
                details["cache_write_1h_tokens"] = min(hour, write)
    return out


def from_anthropic(data: dict[str, Any], model: str, created: int | None = None) -> dict[str, Any]:
    """A ``chat.completion`` for a Messages API answer; ``model`` is the name the client used."""
    if data.get("type") != "message" or not isinstance(data.get("content"), list):
        # (a proxy in front answering 200 with an error body, say): as the OpenAI provider's
        # unexpected body, that deployment's failure; nothing was sent yet, so the next is tried
        raise UpstreamError("the anthropic upstream sent an unexpected body", retryable=True)
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for block in data["content"]:
        if block.get("type") == "text":
            texts.append(block.get("text", ""))
        elif block.get("type") == "tool_use":
            calls.append(
                {
                    "id": block.get("id", ""),
                    "type": "function",
                    "function": {
                        "name": block.get("name", ""),
                        "arguments": orjson.dumps(block.get("input") or {}).decode(),
                    },
                }
            )
    message: dict[str, Any] = {
        "role": "assistant",
        "content": "".join(texts) if texts or not calls else None,
        "refusal": None,
    }
    if calls:
        message["tool_calls"] = calls
    return {
        "id": data.get("id", ""),
        "object": "chat.completion",
        "created": created if created is not None else int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": STOP_REASONS.get(data.get("stop_reason") or "", "stop"),
            }
        ],
        "usage": usage_of(data.get("usage")),
    }
