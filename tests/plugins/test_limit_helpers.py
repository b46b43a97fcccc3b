"""Factories shared by the limit plugin's tests (no tests here)."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

from gateway.catalogue import Deployment, ModelEntry, Price
from gateway.context import Identity, RequestContext, Usage
from plugins.limit import LimitConfig, LimitPlugin

ENTRY = ModelEntry(
    name="demo",
    deployments=(
        Deployment(
            model="demo-upstream",
            base_url="http://127.0.0.1:9/v1",
            # $1 per 100k prompt tokens, $2 per 100k completion tokens: easy sums.
            price=Price(input_per_mtok=10.0, output_per_mtok=20.0),
        ),
    ),
)
_ids = itertools.count()


class Clock:
    """An injectable wall clock (UTC epoch seconds)."""

    def __init__(self, now: float = 1_767_225_600.0) -> None:  # 2026-01-01T00:00:00Z
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make_plugin(clock: Callable[[], float] | None = None, **config: Any) -> LimitPlugin:
    return LimitPlugin(LimitConfig.model_validate(config), clock=clock or Clock())


def make_ctx(
    user: str | None = "alice",
    *,
    tenant: str = "acme",
    tier: str = "free",
    credential_id: str = "key-1",
    client: str = "127.0.0.1",
    max_tokens: int | None = 100,
    prompt: str = "hello",
    endpoint: str = "chat",
    **body: Any,
) -> RequestContext:
    data: dict[str, Any] = {"model": "demo", "messages": [{"role": "user", "content": prompt}]}
    if max_tokens is not None:
        data["max_tokens"] = max_tokens
    data.update(body)
    ctx = RequestContext(
        request_id=f"req-{next(_ids)}",
        endpoint=endpoint,
        path="/v1/chat/completions",
        method="POST",
        headers={},
        raw_headers=[],
        body=data,
        client=client,
        model="demo",
        model_entry=ENTRY,
    )
    if user is not None:
        ctx.identity = Identity(user, tenant, (), tier, credential_id)
    return ctx


def finish(
    ctx: RequestContext,
    prompt_tokens: int = 0,
    completion_tokens: int = 0,
    *,
    status: int = 200,
    usage: bool = True,
    disconnected: bool = False,
) -> RequestContext:
    """What the core sets before ``on_response``."""
    ctx.status = status
    ctx.usage = Usage(prompt_tokens, completion_tokens) if usage else None
    ctx.client_disconnected = disconnected
    return ctx
