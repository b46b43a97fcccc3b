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
