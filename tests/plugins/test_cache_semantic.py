"""cache plugin, semantic mode: the real all-MiniLM-L6-v2 model (offline, CPU) finds a
paraphrase, ignores an unrelated prompt, and never matches across tenants or request shapes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import orjson
import pytest

from gateway.context import Usage
from plugins.cache import CacheConfig, CachePlugin
from plugins.cache.semantic import SemanticIndex

from .test_cache import make_ctx


def ask(text: str, tenant: str = "acme", **body: Any) -> Any:
    return make_ctx(tenant=tenant, messages=[{"role": "user", "content": text}], **body)


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
async def plugin() -> AsyncIterator[CachePlugin]:
    p = CachePlugin(CacheConfig.model_validate({"semantic": {"enabled": True, "threshold": 0.85}}))
    await p.startup(None)
    ctx = ask("What is the capital of France?")
    assert await p.on_request(ctx) is None
    ctx.status, ctx.usage = 200, Usage(5, 1)
    ctx.response = {"choices": [{"message": {"content": "Paris"}}]}
    await p.on_response(ctx)
    yield p
    await p.shutdown()


@pytest.mark.anyio
async def test_paraphrase_is_a_semantic_hit_with_zero_cost(plugin: CachePlugin) -> None:
    ctx = ask("what is the capital city of France")
    answer = await plugin.on_request(ctx)
    assert answer is not None
    assert orjson.loads(answer.body)["choices"][0]["message"]["content"] == "Paris"
    assert ctx.log["cache"] == "hit" and 0.85 <= ctx.log["cache_similarity"] < 1
    assert ctx.usage == Usage(0, 0)


@pytest.mark.anyio
async def test_unrelated_prompt_other_tenant_and_other_params_miss(plugin: CachePlugin) -> None:
    assert await plugin.on_request(ask("How do I bake sourdough bread?")) is None
    assert await plugin.on_request(ask("what is the capital city of France", "globex")) is None
    assert await plugin.on_request(ask("what is the capital city of France", max_tokens=3)) is None


@pytest.mark.anyio
async def test_index_is_bounded_per_group_and_in_groups() -> None:
    vectors = {"a": [1.0, 0.0], "b": [0.0, 1.0], "c": [0.6, 0.8]}
    index = SemanticIndex(lambda t: np.array(vectors[t]), threshold=0.9, cap=2, max_groups=2)
    for name in ("a", "b", "c"):
        index.add("g1", name, await index.embed(name))
    assert list(index.groups["g1"].keys) == ["b", "c"]  # oldest dropped at the cap
    assert index.lookup("g1", await index.embed("a")) is None  # a is gone; c is 0.6 away
    assert index.lookup("g1", await index.embed("c")) == ("c", pytest.approx(1.0))
    index.add("g2", "a", await index.embed("a"))
    index.add("g3", "a", await index.embed("a"))
    assert set(index.groups) == {"g2", "g3"}
    index.close()


@pytest.mark.anyio
async def test_the_same_words_about_another_image_or_tool_result_miss() -> None:
    p = CachePlugin(CacheConfig.model_validate({"semantic": {"enabled": True, "threshold": 0.85}}))
    await p.startup(None)

    def image(url: str) -> list[dict[str, Any]]:
        return [{"role": "user", "content": [
            {"type": "text", "text": "What animal is in this picture?"},
            {"type": "image_url", "image_url": {"url": url}}]}]  # fmt: skip

    def weather(city: str) -> list[dict[str, Any]]:
        return [
            {"role": "user", "content": "What is the weather there?"},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function",
             "function": {"name": "weather", "arguments": '{"city": "' + city + '"}'}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        ]  # fmt: skip

    for first, second in (
        (image("data:cat"), image("data:dog")),
        (weather("Paris"), weather("Tokyo")),
    ):
        ctx = make_ctx(messages=first)
        assert await p.on_request(ctx) is None
        ctx.status, ctx.usage = 200, Usage(5, 1)
        ctx.response = {"choices": [{"message": {"content": "the first answer"}}]}
        await p.on_response(ctx)
        assert await p.on_request(make_ctx(messages=second)) is None  # not the first's answer
        again = await p.on_request(make_ctx(messages=first))
        assert again is not None  # (the first is still there)
    await p.shutdown()
