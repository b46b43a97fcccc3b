"""The secret detectors' patterns (gateway/redact.py) and prefilters (gateway/secret_hints.py)."""

from __future__ import annotations

import random
import re

import pytest

from gateway import redact
from gateway import secret_hints as prefilter
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


OUTPUT_TYPES = frozenset({"api_key", "private_key", "jwt", "credit_card"})


def test_prefilter_for_types_without_short_numbers_is_the_same_as_scanning_everything(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With no IBAN or phone type asked for, two digits are not a hint: only a long number
    (a card) is. The hits are the same as with no prefilter at all."""
    rnd = random.Random(11)
    alphabet = "0123456789 -+abcXYZ@.()"
    texts = [
        "call me at 12 or 34",
        "card 4111 1111 1111 1111 here",
        "+44 20 7946 0958 and DE89 3704 0044 0532 0130 00",
        "sk-" + "a" * 30,
        *("".join(rnd.choice(alphabet) for _ in range(rnd.randint(0, 60))) for _ in range(3000)),
    ]
    all_types = (OUTPUT_TYPES, frozenset({"credit_card"}), frozenset({"iban", "phone"}), None)
    got = [find_secrets(text, types) for types in all_types for text in texts]
    monkeypatch.setattr(redact, "may_hold_secret", lambda text, types: True)
    assert got == [find_secrets(text, types) for types in all_types for text in texts]
    assert [h.type for h in find_secrets("card 4111 1111 1111 1111", OUTPUT_TYPES)] == [
        "credit_card"
    ]
    assert find_secrets("+44 20 7946 0958", OUTPUT_TYPES) == []
    assert [h.type for h in find_secrets("+44 20 7946 0958", frozenset({"phone"}))] == ["phone"]


#: What the key, JWT and key-block hints stand for.
_HINTS = ("-----BEGIN", "eyJ", "sk-", "_live_", "AKIA", "ASIA", "AIza", "xox", "ghp_", "gho_",
          "ghu_", "ghs_", "ghr_", "github_pat_")  # fmt: skip


def test_key_hints_and_digit_pairs_say_what_substring_tests_say() -> None:
    rnd = random.Random(14)
    pieces = ["sk-", "_live_", "AKIA", "ASIA", "AIza", "xox", "ghp_", "ghr_", "github_pat_", "eyJ",
              "-----BEGIN", "-----", "1", "2 3", "4-5", "6--7", "8  9", "0", " ", "-", "_", "a",
              "e", "s", "k", "g", "h", "J", "y", "A", "K", "I", "x", "o", "github", "pat_", "\n",
              "\u0661\u0662", "\u0663 \u0664"]  # fmt: skip
    texts = ["".join(rnd.choice(pieces) for _ in range(rnd.randint(0, 20))) for _ in range(20000)]
    for text in texts:
        pair = prefilter._DIGIT_PAIR if text.isascii() else prefilter._DIGIT_PAIR_UNICODE
        two = any(h in text for h in _HINTS) or pair.search(text) is not None
        keys = any(h in text for h in _HINTS[2:])
        assert (prefilter._API_HINT.search(text) is not None) == keys, text
        assert (prefilter._OTHER_HINTS.search(text) is not None) == any(h in text for h in _HINTS)
        if text.isascii():
            assert (prefilter._HINT_OR_DIGIT_PAIR.search(text) is not None) == two, text
        for types in (None, frozenset({"phone"}), frozenset({"iban", "email"})):
            assert prefilter.may_hold_secret(text, types) == ("@" in text or two), text


def test_hints_or_a_long_number_in_one_sweep_say_what_the_two_searches_say() -> None:
    """The output guard's types (cards, no IBAN or phone) on an ASCII text: the key hints or a
    card's long number, in one search."""
    rnd = random.Random(15)
    pieces = ["sk-", "_live_", "AKIA", "AIza", "xox", "ghp_", "github_pat_", "eyJ", "-----BEGIN",
              "4111 1111 1111 1111", "1234-5678", "234 5678 901", *"0123456789", " ", "-", "_",
              "A", "J", "x", "a", "\n", "\u0661\u0662", "é"]  # fmt: skip
    long_number = re.compile(r"[0-9][0-9 \-]{11,}[0-9]")
    for _ in range(20000):
        text = "".join(rnd.choice(pieces) for _ in range(rnd.randint(0, 16)))
        for types in (OUTPUT_TYPES, frozenset({"credit_card"}), frozenset({"api_key", "jwt"})):
            want = "@" in text or prefilter._OTHER_HINTS.search(text) is not None
            if "credit_card" in types and len(text) >= 13:
                want = want or prefilter._LONG_NUMBER.search(text) is not None
            assert prefilter.may_hold_secret(text, types) == want, (text, types)
            if text.isascii() and "credit_card" in types:
                long = long_number.search(text) is not None
                assert (prefilter._LONG_NUMBER.search(text) is not None) == long
                hint = prefilter._OTHER_HINTS.search(text) is not None
                assert (prefilter._HINT_OR_LONG_NUMBER.search(text) is not None) == (hint or long)


def test_iban_card_and_key_hints_equal_what_they_replaced() -> None:
    """IBANs tried only at their hint's digits are the pattern's whole-text matches; the card
    and IBAN hints in one sweep, and the one key-prefix search, say what the tests they
    replaced said."""
    rnd = random.Random(12)
    pieces = ["DE89", "3704", " ", "0044", "GB82", "WEST", "12", "AB", "x", "\u0664\u0661", "Ab",
              "-", "4111 1111 1111 1111", "1", "A", "sk-", "_live_", "AKIA", "ASIA", "AIza", "xox",
              "gh", "ghp_", "github_pat_", "eyJ", "-----BEGIN", "@", "é", "\n"]  # fmt: skip
    texts = ["".join(rnd.choice(pieces) for _ in range(rnd.randint(0, 30))) for _ in range(5000)]
    coarse = ("sk-", "_live_", "AKIA", "ASIA", "AIza", "xox")
    github = ("ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_")
    hints = ("@", "-----BEGIN", "eyJ", *coarse)
    for text in texts:
        want = [m.span() for m in _COMPILED["iban"].finditer(text)]
        assert [m.span() for m in redact._ibans(text)] == want, text
        digits = (prefilter.may_contain("credit_card", text), prefilter.may_contain("iban", text))
        assert prefilter.card_and_iban_hints(text) == digits, text
        keys = any(p in text for p in coarse) or any(p in text for p in github)
        assert prefilter.may_contain("api_key", text) == keys, text
        any_hint = any(h in text for h in hints) or any(p in text for p in github)
        if any_hint:
            assert prefilter.may_hold_secret(text, frozenset()), text


def test_a_fine_grained_github_token_is_found_in_any_text() -> None:
    """The prefix "github_pat_" was only looked for where "gh" also occurred, which it does
    not contain: a fine-grained GitHub token in a text without another "gh" was not found at
    all (in prompts, in the output guard's answers, in logged text)."""
    token = "github_pat_" + "A1b2" * 12
    for text in (f"my token is {token}", f"{token}", f"use {token} on the ghost repo"):
        hits = find_secrets(text, None)
        assert [(h.type, text[h.start : h.end]) for h in hits] == [("api_key", token)], text
        assert find_secrets(text, OUTPUT_TYPES), text


def test_overlapping_findings_are_redacted_as_one_span_covering_both() -> None:
    """An e-mail whose local part starts inside a phone number (no space between) used to be
    dropped as overlapping, leaving its address in the redacted text."""
    text = "call +1 (555) 123-4567jane.doe+x@example.co.uk today"
    hits = find_secrets(text, frozenset({"phone", "email"}))
    assert [(h.type, text[h.start : h.end]) for h in hits] == [
        ("phone", "+1 (555) 123-4567jane.doe+x@example.co.uk")
    ]
    assert redact.redact(text, hits) == "call [REDACTED:phone] today"
    # Contained findings still give one span: a key block holds base64 "numbers".
    key = "-----BEGIN PRIVATE KEY-----\nMIIE 4111 1111 1111 1111\n-----END PRIVATE KEY-----"
    hits = find_secrets(key, None)
    assert [(h.type, h.start, h.end) for h in hits] == [("private_key", 0, len(key))]


def test_keys_with_a_distinct_prefix_are_found_inside_words_but_slugs_are_not() -> None:
    def keys(text: str) -> list[str]:
        return [text[h.start : h.end] for h in find_secrets(text, None) if h.type == "api_key"]

    key = "sk-proj-Zx9Qw8Er7Ty6Ui5Op4As3Df2Gh1Jk0LzXcVbNm1234abcd"
    legacy = "sk-" + "aB3dE6fG9hJ2kL5mN8pQ1rS4tU7vW0xY3zA6bC9dE2fG5h"
    for glued in ("A" + key, "x" + key, "0" + key, "Xsk-" + key):
        assert keys(glued) == [key], glued
    assert keys("Q" + legacy) == [legacy]
    assert keys("AKIAZ7QK2M4P9XR3LN5Tx") == ["AKIAZ7QK2M4P9XR3LN5T"]
    assert keys("zAKIAZ7QK2M4P9XR3LN5T") == ["AKIAZ7QK2M4P9XR3LN5T"]
    # Words that end in "sk-" followed by a slug or an id are not keys.
    for text in (
        "see /blog/risk-assessment-framework-implementation-guide",
        "task-3f2a9c8e7d6b5a4c3b2a1f0e9d8c7b6a done",
        "mask-image-linear-gradient-to-bottom-right-corner",
        "desk-ABCDEFGHIJKLMNOPQRSTUVWXYZABCDEF",
    ):
        assert keys(text) == [], text
    # A bare "sk-" word is still a key however it looks.
    assert keys("the sk-abcdefghijklmnopqrstuvwx key") == ["sk-abcdefghijklmnopqrstuvwx"]


def test_a_card_number_right_after_another_number_is_found() -> None:
    """The card pattern is greedy: "3.14 4933-..." matched from the "14" (18 digits, not a
    valid card) and the card itself was never tried."""
    for text, card in [
        ("pi is 3.14 4933-2029-4382-8554 ok", "4933-2029-4382-8554"),
        ("4933 2029 4382 8554 12 apples", "4933 2029 4382 8554"),
    ]:
        hits = find_secrets(text)
        assert [(h.type, text[h.start : h.end]) for h in hits] == [("credit_card", card)]
    assert find_secrets("order 12345 6789 and 3.14 2718") == []


def test_a_jwt_glued_to_an_escaped_line_break_is_found() -> None:
    """Tool-call arguments are JSON text: "\\n" before the token leaves an "n" glued to it."""
    token = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.jQxfDD94xroqOYBcvWW9"
    args = '{"body": "hi\\n' + token + '"}'
    hits = find_secrets(args)
    assert [(h.type, args[h.start : h.end]) for h in hits] == [("jwt", token)]


def test_numbers_that_pass_luhn_but_no_card_network_issues_are_not_cards() -> None:
    def cards(text: str) -> list[str]:
        hits = find_secrets(text, frozenset({"credit_card"}))
        return [text[h.start : h.end] for h in hits]

    # The networks' own test numbers are still cards.
    for card in ("4111 1111 1111 1111", "5555555555554444", "378282246310005",
                 "6011111111111117", "3530111333300000", "2223003122003222",
                 "30569309025904", "6200000000000005"):  # fmt: skip
        assert cards(f"pay with {card} today") == [card], card
        assert redact.luhn_ok(card.replace(" ", ""))
    # Other scripts' digits (what the pattern's \d matches) are read as the digits they are.
    fullwidth = "".join(chr(0xFF10 + int(c)) for c in "5555555555554444")
    arabic_indic = "".join(chr(0x0660 + int(c)) for c in "378282246310005")
    for card in (fullwidth, arabic_indic):
        assert cards(f"card {card} ok") == [card]
    # Luhn-valid numbers no network issues: an IMEI (15 digits from 35), a chat id, a phone
    # number written from 00, a Visa prefix at a length Visa does not use.
    for number in ("352099001761481", "1148276533041184733", "004915112345678",
                   "41111111111111113"):  # fmt: skip
        assert redact.luhn_ok(number), number
        assert cards(f"id {number} here") == [], number


def test_placeholder_keys_and_file_or_scp_names_are_not_secrets() -> None:
    def found(text: str) -> list[tuple[str, str]]:
        return [(h.type, text[h.start : h.end]) for h in find_secrets(text, None)]

    placeholders = (
        "OPENAI_API_KEY=sk-your-openai-api-key-here",
        "aws_access_key_id = AKIAIOSFODNN7EXAMPLE",
        "export KEY=sk-proj-xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
        "Authorization: Bearer sk-REPLACE-WITH-YOUR-KEY-0123456789",
    )
    for placeholder_key in placeholders:
        assert found(placeholder_key) == [], placeholder_key
    assert found("use logo@2x.png and icon@3x.webp on retina screens") == []
    assert found("git clone git@github.com:acme/app.git") == []
    # Real-looking keys and mail still are.
    key = "sk-proj-Zx9Qw8Er7Ty6Ui5Op4As3Df2Gh1Jk0LzXcVbNm1234abcd"
    assert found(f"key {key}") == [("api_key", key)]
    assert found("write to jane@example.com: she knows") == [("email", "jane@example.com")]
