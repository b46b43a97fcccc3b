"""``headers``: the smallest plugin, proving the contract.

Adds configured headers to the request sent upstream and/or to the response the client gets.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, ClassVar

from pydantic import Field, field_validator

from gateway.plugin import Plugin, PluginConfig

if TYPE_CHECKING:
    from gateway.context import RequestContext

_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_FORBIDDEN = {"authorization", "x-api-key", "api-key", "host", "content-length", "cookie"}


class HeadersConfig(PluginConfig):
    #: Headers added to every response the client receives from this pipeline.
    response: dict[str, str] = Field(default_factory=dict)
    #: Headers added to the request sent upstream (credentials are refused here: use the
    #: deployment's ``api_key``).
    upstream: dict[str, str] = Field(default_factory=dict)

    @field_validator("response", "upstream")
    @classmethod
    def _names(cls, v: dict[str, str]) -> dict[str, str]:
        for name, value in v.items():
            if not _TOKEN.match(name):
                raise ValueError(f"invalid header name {name!r}")
            if name.lower() in _FORBIDDEN:
                raise ValueError(f"header {name!r} may not be set here")
            if "\r" in value or "\n" in value:
                raise ValueError(f"header {name!r}: value may not contain line breaks")
        return v


class HeadersPlugin(Plugin):
    name = "headers"
    Config = HeadersConfig
    endpoints: ClassVar[frozenset[str]] = frozenset({"chat", "embeddings"})
    config: HeadersConfig

    def __init__(self, config: HeadersConfig) -> None:
        super().__init__(config)
        # Plain dicts, read on every request (a pydantic attribute read costs ~450 instructions).
        self._response = dict(config.response)
        self._upstream = dict(config.upstream)

    async def on_headers(self, ctx: RequestContext) -> None:
        # Before any plugin may answer: a cache hit, a refusal, an error get them too.
        ctx.response_headers.update(self._response)

    async def on_request(self, ctx: RequestContext) -> None:
        if self._upstream:
            ctx.upstream_headers.update(self._upstream)

    def uses(self, hook: str) -> bool:
        # Only the hooks with something to do run (each is a coroutine per request).
        if hook == "on_headers" and not self._response:
            return False
        if hook == "on_request" and not self._upstream:
            return False
        return super().uses(hook)
