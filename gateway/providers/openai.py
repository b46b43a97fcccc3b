"""OpenAI and any OpenAI-compatible server (vLLM, Ollama, llama.cpp, LocalAI ...)."""

from __future__ import annotations

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

    async def json(self) -> dict[str, Any]:
        with self._errors:
            raw = await self._resp.read()
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            from gateway.errors import UpstreamError

            raise UpstreamError(f"the {self._provider} upstream sent invalid JSON") from None
        if not isinstance(data, dict):
            from gateway.errors import UpstreamError

            raise UpstreamError(f"the {self._provider} upstream sent an unexpected body")
        return data

    async def iter_bytes(self) -> AsyncIterator[bytes]:  # type: ignore[override]
        with self._errors:
            async for data in self._resp.content.iter_any():
                yield data

    def close(self) -> None:
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
        return AiohttpResponse(await self.post(ctx, "/chat/completions", body), self.name)

    async def embeddings(self, ctx: RequestContext, body: dict[str, Any]) -> UpstreamResponse:
        return AiohttpResponse(await self.post(ctx, "/embeddings", body), self.name)
