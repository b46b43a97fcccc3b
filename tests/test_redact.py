"""The secret detectors' patterns (gateway/redact.py)."""

from __future__ import annotations

import random
import re

from gateway.redact import _COMPILED, find_secrets

#: The card pattern as first written: a look-behind first, which the engine tried at every
#: position. The shipped one starts with a digit; both must find exactly the same spans.
CARD_REFERENCE = re.compile(r"(?<![\d\-])(?:\d[ \-]?){12,18}\d(?![\d\-])")


def test_card_pattern_matches_exactly_like_the_reference() -> None:
    rnd = random.Random(7)
    for _ in range(20_000):
        s = "".join(rnd.choice("0123456789 -x") for _ in range(rnd.randint(0, 40)))
        got = [m.span() for m in _COMPILED["credit_card"].finditer(s)]
        assert got == [m.span() for m in CARD_REFERENCE.finditer(s)], s


def test_card_found_at_the_start_and_not_inside_longer_numbers() -> None:
    assert [h.type for h in find_secrets("4111 1111 1111 1111 is a test card")] == ["credit_card"]
    assert find_secrets("order-4111111111111111") == []  # glued to a hyphen: not a card
