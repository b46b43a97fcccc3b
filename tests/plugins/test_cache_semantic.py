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


async def stored(p: CachePlugin, messages: list[dict[str, Any]], answer: str) -> None:
    ctx = make_ctx(messages=messages)
    assert await p.on_request(ctx) is None
    ctx.status, ctx.usage = 200, Usage(5, 1)
    ctx.response = {"choices": [{"message": {"content": answer}}]}
    await p.on_response(ctx)


@pytest.mark.anyio
async def test_a_long_system_prompt_does_not_make_every_question_match() -> None:
    """The whole conversation was embedded: a 300-token system prompt filled the model's 256
    tokens, the question was never seen, and every question matched at 1.0."""
    p = CachePlugin(CacheConfig.model_validate({"semantic": {"enabled": True, "threshold": 0.85}}))
    await p.startup(None)
    system = {"role": "system", "content": "You are the help desk of Acme Corp. " * 40}
    await stored(p, [system, {"role": "user", "content": "What is the capital of France?"}],
                 "Paris")  # fmt: skip
    other = make_ctx(messages=[system, {"role": "user", "content": "Delete all customer records"}])
    assert await p.on_request(other) is None
    same = make_ctx(messages=[system, {"role": "user", "content": "capital city of France?"}])
    assert await p.on_request(same) is not None
    # Another system prompt is another conversation, however close the question.
    sys2 = {"role": "system", "content": "You are a pirate."}
    assert await p.on_request(make_ctx(messages=[sys2, {"role": "user",
                                       "content": "capital city of France?"}])) is None  # fmt: skip
    # A question too long to embed whole gets exact hits only.
    long_q = "Summarise: " + "the quarterly report shows growth " * 60
    await stored(p, [{"role": "user", "content": long_q + "in Europe."}], "Europe grew")
    assert await p.on_request(make_ctx(messages=[{"role": "user",
                                       "content": long_q + "in Asia."}])) is None  # fmt: skip
    await p.shutdown()


@pytest.mark.anyio
async def test_a_semantic_hit_is_checked_by_the_guard_after_the_cache() -> None:
    """Only the stored prompt passed the guard; its near twin carrying a key was answered."""
    from types import SimpleNamespace

    from gateway.errors import ContentPolicyError
    from plugins.guard import GuardConfig, GuardPlugin

    guard = GuardPlugin(GuardConfig.model_validate({"semantic": {"enabled": False}}))
    gateway = SimpleNamespace(
        pipeline=SimpleNamespace(plugins=[SimpleNamespace(name="auth"),
                                          SimpleNamespace(name="cache"), guard]),
        settings=SimpleNamespace(source="g.yaml"),
    )  # fmt: skip
    # (a low threshold, so that the twin is a hit whatever the key does to its vector)
    p = CachePlugin(CacheConfig.model_validate({"semantic": {"enabled": True, "threshold": 0.5}}))
    await p.startup(gateway)  # type: ignore[arg-type]
    await stored(p, [{"role": "user", "content": "Please check my key for typos"}], "ok")
    key = "sk-proj-AbCdEfGhIjKlMnOpQrStUvWxYz0123456789"
    twin = make_ctx(messages=[{"role": "user", "content": f"Please check my key for typos {key}"}])
    with pytest.raises(ContentPolicyError):
        await p.on_request(twin)
    plain = make_ctx(messages=[{"role": "user", "content": "please check my key for typos!"}])
    assert await p.on_request(plain) is not None
    await p.shutdown()
