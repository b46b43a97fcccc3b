"""With the output guard, a stream's reasoning stays ahead of its answer: the words of
``reasoning_content`` held back (they might begin a secret) go out when the answer begins,
not after its first words at ``finish_reason`` (a UI showing a thinking block got its last
words after the answer had started)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.test_stream_guard_blocks import KEY, event, guard, per_event, relay, small


def _order(events: list[Any], index: int = 0) -> list[str]:
    """Which part of the choice each piece of text went out in, in order."""
    out = []
    for e in events:
        for ch in e.get("choices") or () if isinstance(e, dict) else ():
            if ch.get("index", 0) != index:
                continue
            delta = ch.get("delta") or {}
            for key in ("reasoning_content", "reasoning", "content", "refusal", "tool_calls"):
                if delta.get(key):
                    out.append(key)
    return out


def _joined(events: list[Any], key: str) -> str:
    return "".join(
        (ch.get("delta") or {}).get(key) or ""
        for e in events
        if isinstance(e, dict)
        for ch in e.get("choices") or ()
    )


THOUGHT = "The user wants a greeting, so I will say hello and keep it short"
ANSWER = "Hello there! How can I help you today?"


def _stream(field: str, answer: list[bytes]) -> bytes:
    return b"".join(
        [event({"role": "assistant", "content": ""})]
        + [event({field: p}) for p in small(THOUGHT, 5)]
        + answer
        + [event({}, finish="stop"), b"data: [DONE]\n\n"]
    )


@pytest.mark.anyio
@pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])
@pytest.mark.parametrize("reads", ["one", "per_event"])
@pytest.mark.parametrize("shape", ["text", "text_with_logprobs", "tool_call"])
async def test_reasoning_goes_out_before_the_answer_begins(
    field: str, reads: str, shape: str
) -> None:
    if shape == "text":
        answer = [event({"content": p}) for p in small(ANSWER, 4)]
        first = "content"
    elif shape == "text_with_logprobs":  # (not text-only: the chunk is handled alone)
        answer = [event({"content": p, "refusal": None}) for p in small(ANSWER, 4)]
        first = "content"
    else:
        call = {"index": 0, "id": "c1", "type": "function",
                "function": {"name": "greet", "arguments": '{"who": "you"}'}}  # fmt: skip
        answer = [event({"tool_calls": [call]})]
        first = "tool_calls"
    data = _stream(field, answer)
    events, _, _ = await relay(guard(), data, per_event(data) if reads == "per_event" else None)
    order = _order(events)
    assert first in order
    begins = order.index(first)
    assert field in order[:begins] and field not in order[begins:], order
    assert _joined(events, field) == THOUGHT  # nothing lost, nothing doubled
    if first == "content":
        assert _joined(events, "content") == ANSWER


@pytest.mark.anyio
async def test_a_secret_in_reasoning_is_still_redacted_when_the_answer_begins() -> None:
    """The reasoning's held words are checked as they are flushed: a key cut where the
    answer begins is still redacted (not released half-seen)."""
    thought = f"I must not print {KEY}"
    data = b"".join(
        [event({"role": "assistant", "content": ""})]
        + [event({"reasoning_content": p}) for p in small(thought, 6)]
        + [event({"content": "No."}), event({}, finish="stop"), b"data: [DONE]\n\n"]
    )
    for reads in (None, per_event(data)):
        events, _, _ = await relay(guard(), data, reads)
        assert KEY[:12] not in json.dumps(events)
        assert _joined(events, "reasoning_content") == "I must not print [REDACTED:api_key]"
        order = _order(events)
        assert order.index("content") > max(
            i for i, k in enumerate(order) if k == "reasoning_content"
        )


@pytest.mark.anyio
async def test_shadow_mode_changes_nothing_in_the_order() -> None:
    data = _stream("reasoning_content", [event({"content": p}) for p in small(ANSWER, 4)])
    events, _, _ = await relay(guard(mode="shadow"), data, per_event(data))
    assert _joined(events, "reasoning_content") == THOUGHT
    assert _joined(events, "content") == ANSWER
    # Every event went on as it came: no chunk of the gateway's own was added.
    assert len([e for e in events if isinstance(e, dict)]) == data.count(b"data: {")
