"""Anthropic's Messages API, translated both ways so the core only sees the OpenAI format.

``base_url`` includes the version prefix, as for OpenAI: ``https://api.anthropic.com/v1``
(requests go to ``{base_url}/messages``). The key travels as ``x-api-key``;
``anthropic-version`` is ``2023-06-01`` unless the deployment's ``headers`` set another.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING, Any

import orjson

from gateway.errors import GatewayError, UpstreamError
from gateway.providers.anthropic_stream import StreamTranslator
from gateway.providers.anthropic_translate import (
    error_from_body,
    from_anthropic,
    max_tokens,
    to_anthropic,
)
from gateway.providers.base import Provider, UpstreamResponse
from gateway.providers.openai import AiohttpResponse

if TYPE_CHECKING:
    import aiohttp

    from gateway.catalogue import Deployment
    from gateway.context import RequestContext

ANTHROPIC_VERSION = "2023-06-01"


class AnthropicResponse(AiohttpResponse):
    """A 2xx Messages API answer, read back as OpenAI JSON or OpenAI SSE bytes."""

    def __init__(self, resp: aiohttp.ClientResponse, model: str) -> None:
        super().__init__(resp, "anthropic")
        self._model = model
        self._created = int(time.time())

    async def json(self) -> dict[str, Any]:
        return from_anthropic(await super().json(), self._model, self._created)

    async def iter_bytes(self) -> AsyncIterator[bytes]:  # type: ignore[override]
        translator = StreamTranslator(self._model, self._created)
        async for data in super().iter_bytes():
            out = translator.feed(data)
            if out:
                yield out
            translator.raise_pending()
        if not translator.done:
            raise UpstreamError(
                "the anthropic upstream stream ended before it was complete",
                retryable=not translator.started,
            )


class AnthropicProvider(Provider):
    name = "anthropic"

    def auth_headers(self) -> dict[str, str]:
        headers = {"anthropic-version": ANTHROPIC_VERSION}
        headers.update({k.lower(): v for k, v in self.deployment.headers.items()})
        if self.deployment.api_key:
            headers["x-api-key"] = self.deployment.api_key
        return headers

    @staticmethod
    def output_tokens(deployment: Deployment, asked: int) -> int:
        return max_tokens(asked, deployment.max_output_tokens)

    def error_for(self, status: int, headers: Mapping[str, str], raw: bytes) -> GatewayError:
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError:
            obj = None
        return error_from_body(obj, headers, status)  # type: ignore[arg-type]

    async def chat(self, ctx: RequestContext, body: dict[str, Any]) -> UpstreamResponse:
        payload = to_anthropic(body, body["model"], self.deployment.max_output_tokens)
        resp = await self.post(ctx, "/messages", payload)
        return AnthropicResponse(resp, body["model"]).keep_secrets(self)
