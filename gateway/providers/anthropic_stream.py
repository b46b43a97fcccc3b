"""Anthropic's streamed Messages API events, translated into OpenAI ``chat.completion.chunk``
SSE events as the bytes arrive (golden-tested with the request and answer translations in
:mod:`gateway.providers.anthropic_translate`).
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from gateway.envelope import join_reads
from gateway.errors import GatewayError, UpstreamError
from gateway.providers.anthropic_translate import STOP_REASONS, error_from_body, usage_of


class StreamTranslator:
    """Anthropic SSE events in, OpenAI ``chat.completion.chunk`` SSE bytes out.

    Feed raw bytes as they arrive (boundaries arbitrary); each call returns the complete OpenAI
    events it could produce. ``message_stop`` yields the usage chunk (``choices: []``) and
    ``data: [DONE]``. An ``error`` event raises: before any output it is retryable like the
    same error as a status; after, the core turns it into the client's SSE error event.
    """

    def __init__(self, model: str, created: int | None = None) -> None:
        self.model = model
        self.created = created if created is not None else int(time.time())
        self.id = ""
        self.buffer = b""
        self.usage: dict[str, Any] = {}
        self.finish: str | None = None
        #: Anthropic content block index → OpenAI tool call index.
        self.tool_index: dict[int, int] = {}
        #: Tool blocks (Anthropic index) whose arguments have had some JSON.
        self.tool_json: set[int] = set()
        #: An ``error`` event that came in the same read as events before it: those go out
        #: first, then the reader raises this (:meth:`raise_pending`).
        self.error: GatewayError | None = None
        self.done = False
        self.started = False
        #: The role chunk of ``message_start``, held until the answer's first output: an error
        #: event before it (Anthropic's overloaded_error comes right after message_start) is
        #: then still one another deployment may serve.
        self.role: bytes | None = None

    def feed(self, data: bytes) -> bytes:
        self.buffer = join_reads(self.buffer, data)
        out: list[bytes] = []
        while True:
            cut = self.buffer.find(b"\n\n")
            if cut == -1:
                break
            event, self.buffer = self.buffer[:cut], self.buffer[cut + 2 :]
            payload = b"\n".join(
                line[5:].lstrip(b" ") for line in event.split(b"\n") if line.startswith(b"data:")
            )
            if not payload:
                continue
            try:
                obj = orjson.loads(payload)
            except orjson.JSONDecodeError:
                raise UpstreamError(  # (retryable while nothing went out)
                    "the anthropic upstream sent a malformed stream event",
                    retryable=not self.started and not out,
                ) from None
            if isinstance(obj, dict):
                try:
                    out.extend(self.event(obj))
                except GatewayError as err:
                    if not out:
                        raise
                    err.retryable = False  # what came before it goes out first
                    self.error = err
                    break
        if out:
            if self.role is not None:
                out.insert(0, self.role)
                self.role = None
            self.started = True
        return b"".join(out)

    def raise_pending(self) -> None:
        """Raise the ``error`` event held back by :meth:`feed`, if any."""
        if self.error is not None:
            raise self.error

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> bytes:
        chunk = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        return b"data: " + orjson.dumps(chunk) + b"\n\n"

    def _take_usage(self, usage: Any) -> None:
        """Counts of ``message_start`` and then ``message_delta`` (cumulative); a count left
        out or null in the later event keeps the earlier one."""
        if isinstance(usage, dict):
            self.usage.update({k: v for k, v in usage.items() if v is not None})

    def event(self, obj: dict[str, Any]) -> list[bytes]:
        kind = obj.get("type")
        if kind == "message_start":
            msg = obj.get("message") or {}
            self.id = msg.get("id", "")
            self._take_usage(msg.get("usage"))
            self.role = self._chunk({"role": "assistant", "content": ""})
            return []
        if kind == "content_block_start":
            block = obj.get("content_block") or {}
            if block.get("type") == "text" and block.get("text"):
                return [self._chunk({"content": block["text"]})]
            if block.get("type") == "tool_use":
                index = int(obj.get("index", 0))
                pos = self.tool_index[index] = len(self.tool_index)
                # Anthropic starts a block with "input": {} and streams the JSON after; a
                # block that arrives whole carries it here.
                given = block.get("input")
                args = orjson.dumps(given).decode() if isinstance(given, dict) and given else ""
                if args:
                    self.tool_json.add(index)
                call = {
                    "index": pos,
                    "id": block.get("id", ""),
                    "type": "function",
                    "function": {"name": block.get("name", ""), "arguments": args},
                }
                return [self._chunk({"tool_calls": [call]})]
            return []
        if kind == "content_block_stop":
            index = int(obj.get("index", 0))
            n = self.tool_index.get(index)
            if n is not None and index not in self.tool_json:
                # A call without arguments: "{}", as OpenAI sends it (an empty string is no
                # JSON, and the SDK's callers parse it).
                self.tool_json.add(index)
                return [
                    self._chunk({"tool_calls": [{"index": n, "function": {"arguments": "{}"}}]})
                ]
            return []
        if kind == "content_block_delta":
            delta = obj.get("delta") or {}
            if delta.get("type") == "text_delta":
                return [self._chunk({"content": delta.get("text", "")})]
            if delta.get("type") == "input_json_delta":
                n = self.tool_index.get(int(obj.get("index", 0)))
                if n is None:
                    return []
                part = delta.get("partial_json", "")
                if not part:
                    return []  # (Anthropic opens every call's JSON with an empty delta)
                self.tool_json.add(int(obj.get("index", 0)))
                call = {"index": n, "function": {"arguments": part}}
                return [self._chunk({"tool_calls": [call]})]
            return []  # thinking and signature deltas have no OpenAI equivalent
        if kind == "message_delta":
            self._take_usage(obj.get("usage"))
            reason = (obj.get("delta") or {}).get("stop_reason")
            self.finish = STOP_REASONS.get(reason or "", "stop")
            return [self._chunk({}, self.finish)]
        if kind == "message_stop":
            self.done = True
            usage = {
                "id": self.id,
                "object": "chat.completion.chunk",
                "created": self.created,
                "model": self.model,
                "choices": [],
                "usage": usage_of(self.usage),
            }
            return [b"data: " + orjson.dumps(usage) + b"\n\n", b"data: [DONE]\n\n"]
        if kind == "error":
            err = error_from_body(obj, {})
            err.retryable = err.retryable and not self.started
            raise err
        return []  # ping
