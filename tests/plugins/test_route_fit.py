"""Context-window fit counts the output tokens the provider will ask for."""

from __future__ import annotations

import pytest

from gateway.catalogue import Catalogue, ModelEntry
from gateway.context import RequestContext
from plugins.route import RoutePlugin
from plugins.route.config import RouteConfig


def _plugin() -> RoutePlugin:
    url = "http://127.0.0.1:1/v1"
    entries = (
        ModelEntry.model_validate({"name": "claude", "fallbacks": ["big"], "deployments": [
            {"id": "claude-a", "provider": "anthropic", "model": "c", "base_url": url,
             "context_window": 5000, "max_output_tokens": 4096},
        ]}),
        ModelEntry.model_validate({"name": "big", "deployments": [
            {"id": "big-a", "model": "b", "base_url": url, "context_window": 5000},
        ]}),
    )  # fmt: skip
    p = RoutePlugin(RouteConfig.model_validate({}), seed=1)
    p.bind(Catalogue(entries))
    return p


def _ctx(p: RoutePlugin, **body: object) -> RequestContext:
    text = "word " * 1500  # ~1,500 tokens
    body = {"model": "claude", "messages": [{"role": "user", "content": text}], **body}
    c = RequestContext("r1", "chat", "/v1/chat/completions", "POST", {}, [], body)
    c.model = "claude"
    assert p.catalogue is not None
    c.model_entry = p.catalogue.get("claude")
    return c


@pytest.mark.anyio
async def test_the_anthropic_default_max_tokens_counts_against_its_window() -> None:
    """No max_tokens from the client: Anthropic is sent max_output_tokens (4,096), which with
    the prompt exceeds its 5,000-token window; an OpenAI deployment is sent none."""
    p = _plugin()
    c = _ctx(p)
    await p.on_request(c)
    assert [d.id for d in c.candidates] == ["big-a"]
    c = _ctx(p, max_tokens=1000)  # asked for less: it fits
    await p.on_request(c)
    assert [d.id for d in c.candidates] == ["claude-a", "big-a"]
