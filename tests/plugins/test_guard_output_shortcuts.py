"""The output guard's shortcuts against what they stand for: each may only skip work whose
result it knows."""

from __future__ import annotations

import random
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.redact import find_secrets
from plugins.guard.delta import response_texts
from plugins.guard.output import _NUMERIC_TAIL, _may_end_number

# The characters the numeric tail is made of, others around them, line breaks, and digits of
# other scripts ("\d" matches them).
_ALPHABET = st.sampled_from(list("0123456789+()- \n\tab.,x²٣५\uff11"))


@settings(max_examples=3000, deadline=None)
@given(st.text(alphabet=_ALPHABET, max_size=12), st.integers(min_value=0, max_value=12))
def test_a_numeric_tail_is_never_ruled_out_where_the_regex_finds_one(text: str, end: int) -> None:
    end = min(end, len(text))
    if _NUMERIC_TAIL.search(text, 0, end) is not None:
        assert _may_end_number(text, end)


def test_the_usual_cut_after_a_word_and_a_space_is_ruled_out() -> None:
    assert not _may_end_number("Echo: Say hello in one short ", 29)
    assert _may_end_number("call +1 (555) 010-", 18)
    assert _may_end_number("call 555\n", 9)


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("0123456789 -")), min_size=0, max_size=16))
def test_short_texts_hold_no_card_number(text: str) -> None:
    # The secrets pre-check skips the long-number search under 13 characters (a card's least).
    if len(text) < 13:
        assert not find_secrets(text, frozenset({"credit_card"}))


def test_a_thirteen_digit_card_is_still_found() -> None:
    assert find_secrets("4222222222222", frozenset({"credit_card"}))  # (Visa's 13-digit test)


def test_a_plain_message_is_read_as_the_full_reading_reads_it() -> None:
    """``response_texts`` reads a message with only role, content, refusal and annotations
    without looking for the other keys: the same texts, in the same order, as once another key
    makes it read every one."""
    rnd = random.Random(5)
    values = ["text", "", None, 3, [{"type": "text", "text": "a"}, {"text": 1}, "x"], []]
    for _ in range(3000):
        choices: list[Any] = []
        for i in range(rnd.randint(0, 3)):
            keys = rnd.sample(["role", "content", "refusal", "annotations"], rnd.randint(0, 4))
            choices.append({"index": i, "message": {k: rnd.choice(values) for k in keys}})
        response = {"choices": choices}
        plain = response_texts(response)
        for choice in choices:
            choice["message"]["tool_calls"] = None  # (not plain any more)
        full = response_texts(response)
        assert [(id(c), id(m), k) for c, m, k in plain] == [(id(c), id(m), k) for c, m, k in full]
