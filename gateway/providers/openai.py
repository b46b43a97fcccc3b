"""OpenAI and any OpenAI-compatible server (vLLM, Ollama, llama.cpp, LocalAI ...)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson

from gateway.providers.base import (
    Provider,
    UpstreamResponse,
    upstream_errors,
)

if TYPE_CHECKING:
    from gateway.context import RequestContext


#: The error mapper of each provider name (stateless, so shared by all its responses).
_ERRORS: dict[str, upstream_errors] = {}


class _ReadWatch:
    """aiohttp's read timeout (``upstream.read_timeout_s``), made cheap for streams.

    aiohttp cancels and re-arms a timer on every read from the socket: about 5k instructions per
    streamed event, an eighth of what a whole read costs the null proxy. This looks at how many
    bytes have arrived once every quarter of the timeout and fails the pending read the way
    aiohttp's timer does when none came for four quarters in a row: never earlier than aiohttp
    would, at most a quarter of the timeout later. It takes over after a stream's first few
    reads; most streams end before its first look."""

    __slots__ = ("content", "handle", "loop", "quiet", "seen", "step")

    def __init__(self, content: aiohttp.StreamReader, timeout: float) -> None:
        self.content = content
        self.loop = asyncio.get_running_loop()
        self.step = timeout / 4
        self.seen = content.total_bytes
        self.quiet = 0
        self.handle: asyncio.TimerHandle | None = self.loop.call_later(self.step, self._look)

    def _look(self) -> None:
        total = self.content.total_bytes
        protocol = getattr(self.content, "_protocol", None)
        if total != self.seen or getattr(protocol, "_reading_paused", False):
            # (Reading paused: the gateway's buffer is full because the client reads slowly.
            # aiohttp's own timer stops then too: sock_read measures the peer, not the client.)
            self.seen, self.quiet = total, 0
        else:
            self.quiet += 1
            if self.quiet == 4:
                self.handle = None
                self.content.set_exception(
                    aiohttp.ServerTimeoutError("Timeout on reading data from socket")
                )
                return
        self.handle = self.loop.call_later(self.step, self._look)

    def stop(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None


#: Reads after which a stream's read timeout moves to a ``_ReadWatch``: an answer that arrives in
#: a few reads (a fast upstream's whole stream often comes in one) never pays for its timer.
_WATCH_AFTER_READS = 4


def _watch_reads(resp: aiohttp.ClientResponse) -> _ReadWatch | None:
    """Move the read timeout of a streamed response from aiohttp's per-read timer to a
    ``_ReadWatch`` (None: nothing left to read, or no timeout)."""
    conn = resp.connection
    protocol = conn.protocol if conn is not None else None
    timeout = protocol.read_timeout if protocol is not None else None
    if protocol is None or not timeout:
        return None
    # Set again by aiohttp for the next request on this connection (set_response_params).
    protocol.read_timeout = None
    return _ReadWatch(resp.content, timeout)


class AiohttpResponse(UpstreamResponse):
    def __init__(self, resp: aiohttp.ClientResponse, provider: str) -> None:
        # UpstreamResponse.__init__, without the call.
        self.status = resp.status
        self.headers = resp.headers  # type: ignore[assignment]
        self._resp = resp
        self._provider = provider
        errors = _ERRORS.get(provider)
        if errors is None:
            errors = _ERRORS[provider] = upstream_errors(provider)
        self._errors = errors
        self._watch: _ReadWatch | None = None

    async def json(self) -> dict[str, Any]:
        with self._errors:
            raw = await self._resp.read()
        for secret in self.secret_bytes:  # (an upstream quoting the request's credentials:
            if raw.find(secret) != -1:  # out before anything, the log included, reads it)
                raw = raw.replace(secret, b"[REDACTED]")
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            from gateway.errors import UpstreamError

            raise UpstreamError(
                f"the {self._provider} upstream sent invalid JSON", retryable=True
            ) from None
        if not isinstance(data, dict):
            from gateway.errors import UpstreamError

            raise UpstreamError(
                f"the {self._provider} upstream sent an unexpected body", retryable=True
            )
        return data

    async def iter_bytes(self) -> AsyncIterator[bytes]:  # type: ignore[override]
        resp = self._resp
        reads = 0
        with self._errors:
            async for data in resp.content.iter_any():
                yield data
                reads += 1
                if reads == _WATCH_AFTER_READS:
                    self._watch = _watch_reads(resp)

    def close(self) -> None:
        if self._watch is not None:
            self._watch.stop()
        # A body read to its end has already handed the connection back to the pool; closing
        # only matters (and only happens) for one abandoned midway.
        if not self._resp.content.at_eof():
            # Abort, not a graceful close: the upstream must see the connection drop at once
            # so it stops generating (and billing) tokens nobody will read.
            conn = self._resp.connection
            if conn is not None and conn.transport is not None:
                conn.transport.abort()
            self._resp.close()
        else:
            self._resp.release()


class OpenAIProvider(Provider):
    name = "openai"

    def auth_headers(self) -> dict[str, str]:
        headers = dict(self.deployment.headers)
        if self.deployment.api_key:
            headers["authorization"] = f"Bearer {self.deployment.api_key}"
        return headers

    async def chat(self, ctx: RequestContext, body: dict[str, Any]) -> UpstreamResponse:
        if body.get("stream") and self.deployment.stream_usage:
            opts = dict(body.get("stream_options") or {})
            opts["include_usage"] = True
            body["stream_options"] = opts
        resp = await self.post(ctx, "/chat/completions", body)
        return AiohttpResponse(resp, self.name).keep_secrets(self)

    async def embeddings(self, ctx: RequestContext, body: dict[str, Any]) -> UpstreamResponse:
        return AiohttpResponse(await self.post(ctx, "/embeddings", body), self.name).keep_secrets(
            self
        )
