"""Token counting: counts equal tiktoken's; the memo keeps digests, not texts, and is bounded."""

from __future__ import annotations

import asyncio
from typing import Any

from gateway import tokens
from gateway.app import create_app
from gateway.config import parse_settings
from tests.helpers import build_config, demo_model


def _direct(text: str, model: str = "") -> int:
    return len(tokens.encoding_for_model(model).encode(text, disallowed_special=()))


def test_counts_equal_tiktoken_with_special_tokens_as_plain_text() -> None:
    long = "word " * 20_000
    texts = ["hello world", "<|endoftext|> and <|fim_prefix|>", "lone \ud800 surrogate", long]
    for model in ("", "gpt-4", "gpt-4o"):
        for text in texts:
            assert tokens.count_text(text, model) == _direct(text, model)
            assert tokens.count_text(text, model) == _direct(text, model)  # remembered


def test_the_two_encodings_are_remembered_apart() -> None:
    text = "Say hello in one short sentence, please. " * 3
    assert tokens.count_text(text, "gpt-4") == _direct(text, "gpt-4")
    assert tokens.count_text(text, "gpt-4o") == _direct(text, "gpt-4o")


def test_the_memo_keeps_digests_not_texts_and_is_bounded() -> None:
    tokens._memo.clear()
    canary = "CANARY-prompt-text-7f3a"
    tokens.count_text(canary)
    assert len(tokens._memo) == 1
    key, count = next(iter(tokens._memo.items()))
    assert len(key) == 16 and canary.encode() not in key and count == _direct(canary)
    for i in range(tokens._MEMO_MAX + 50):
        tokens.count_text(f"text number {i}")
    assert 0 < len(tokens._memo) <= tokens._MEMO_MAX


def test_a_remembered_count_is_used() -> None:
    tokens._memo.clear()
    tokens.count_text("remember me")
    (key,) = tokens._memo
    tokens._memo[key] = 12345  # what a tokenizer call would never say
    assert tokens.count_text("remember me") == 12345
    tokens._memo.clear()


def test_count_messages_matches_the_documented_framing() -> None:
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "image_url"}]},
        {"role": "assistant", "name": "bot", "content": None,
         "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}]},
    ]  # fmt: skip
    want = 3 + 3 * 3 + _direct("Be brief.") + _direct("hi") + 85 + 1 + _direct("f{}")
    assert tokens.count_messages(msgs) == want


def test_startup_loads_only_the_encodings_the_catalogue_uses(monkeypatch: Any) -> None:
    """o200k holds ~70 MB resident, cl100k ~30 MB: a gateway loads the tables of its models'
    names, aliases and upstream models, and only those."""
    loaded: list[str] = []

    def record(name: str = "o200k_base") -> Any:
        loaded.append(name)
        return real(name)

    real = tokens.encoding
    monkeypatch.setattr(tokens, "encoding", record)
    cases = [
        ([demo_model("http://127.0.0.1:9")], ["o200k_base"]),
        # (its upstream model is "gpt-4-upstream": cl100k too)
        ([demo_model("http://127.0.0.1:9", name="gpt-4")], ["cl100k_base"]),
        ([{**demo_model("http://127.0.0.1:9"), "aliases": ["gpt-3.5-turbo"]}],
         ["cl100k_base", "o200k_base"]),
        ([demo_model("http://127.0.0.1:9", model="text-embedding-3-small")],
         ["cl100k_base", "o200k_base"]),
    ]  # fmt: skip
    for models, expected in cases:
        loaded.clear()
        config = build_config("http://127.0.0.1:9", models=models)
        gw = create_app(parse_settings(config, "test-config.yaml")).state.gateway

        async def cycle(gw: Any = gw) -> None:
            await gw.startup()
            await gw.shutdown()

        asyncio.run(cycle())
        assert loaded == expected, models
    assert tokens.encoding_name("gpt-4-turbo") == "cl100k_base"
    assert tokens.encoding_name("gpt-4o-mini") == tokens.encoding_name("o3") == "o200k_base"


def test_the_bound_is_never_under_the_count() -> None:
    """``prompt_tokens_bound`` lets checks skip the tokenizer, so it must never be lower than
    the exact count: texts in many scripts, emoji, special-token text, tool calls and tools,
    images, names, and embedding inputs of strings and token arrays."""
    from gateway.context import RequestContext

    texts = [
        "", "a", "hello world", "<|endoftext|>", "日本語のテキストです", "🙂" * 40,
        "x" * 5000, "Привет, мир! " * 30, "lone \ud800 surrogate", "\t\n  spaced  \n",
        "مرحبا بالعالم", "ok " + "é" * 100, "1234567890" * 20,
    ]  # fmt: skip
    for model in ("m", "gpt-4"):
        for text in texts:
            msgs: list[dict[str, Any]] = [
                {"role": "system", "content": text},
                {"role": "user", "name": "u", "content": [
                    {"type": "text", "text": text}, {"type": "image_url"}]},
                {"role": "assistant", "content": None,
                 "tool_calls": [{"function": {"name": "f", "arguments": text}}]},
            ]  # fmt: skip
            described = text.encode("utf-8", "replace").decode()  # (JSON has no lone surrogate)
            tool = {"type": "function", "function": {"name": "t", "description": described}}
            body = {"model": model, "messages": msgs, "tools": [tool]}
            chat = RequestContext("r", "chat", "/v1/chat/completions", "POST", {}, [], body)
            chat.model = model
            bound = tokens.prompt_tokens_bound(chat)
            assert bound >= tokens.prompt_tokens(chat) > 0
            # Once counted, the bound is the count.
            assert tokens.prompt_tokens_bound(chat) == chat.prompt_tokens_estimate
            emb_body = {"model": model, "input": [text, [1, 2, 3], text]}
            emb = RequestContext("r", "embeddings", "/v1/embeddings", "POST", {}, [], emb_body)
            emb.model = model
            assert tokens.prompt_tokens_bound(emb) >= tokens.prompt_tokens(emb)


def test_the_bound_tokenizes_nothing(monkeypatch: Any) -> None:
    from gateway.context import RequestContext

    def refuse(enc: Any, text: str) -> int:
        raise AssertionError("tokenized")

    monkeypatch.setattr(tokens, "encoded_len", refuse)
    body = {"model": "m", "messages": [{"role": "user", "content": "héllo " * 100}]}
    ctx = RequestContext("r", "chat", "/v1/chat/completions", "POST", {}, [], body)
    # 3 to prime the reply, 3 per message, and the text's UTF-8 bytes.
    assert tokens.prompt_tokens_bound(ctx) == 3 + 3 + len(("héllo " * 100).encode())
    assert ctx.prompt_tokens_estimate is None


def test_every_text_of_earlier_assistant_turns_is_counted() -> None:
    """A replayed custom call's input, a legacy function call and a refusal went uncounted: a
    330,000-character custom input counted as 14 prompt tokens, past every token limit."""
    big = "a b " * 10_000
    for msg in (
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": "c", "type": "custom", "custom": {"name": "x", "input": big}}]},
        {"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
                                              "function": {"name": "f", "arguments": big}}]},
        {"role": "assistant", "content": None, "function_call": {"name": "f", "arguments": big}},
        {"role": "assistant", "content": None, "refusal": big},
    ):  # fmt: skip
        assert tokens.count_messages([msg], "gpt-4o") > 10_000, msg
        assert tokens._messages([msg], tokens.utf8_len) >= len(big), msg
