"""The secret detector's prefilters: whether a text may hold a secret at all, or one of a
given type, before :func:`gateway.redact.find_secrets` runs that type's pattern.

Most texts hold no secret, so these decide most of the detector's cost: substring tests and
searches written so the regex engine skips ahead to a literal. Each must say yes wherever its
type's pattern (``gateway.redact._PATTERNS``) can match: a hint that misses hides the secret.
"""

from __future__ import annotations

import re

# The API keys' prefixes (sk-, sk_live_, rk_live_, AKIA, ASIA, gh?_, github_pat_, xox, AIza) in
# one search ("_live_" for both Stripe ones). Every branch starts with a
# literal, so the engine skips ahead to their first letters: ~40% cheaper on long texts than
# the six to twelve substring tests it replaced. (Until 27 Nov, night, "github_pat_" was only
# looked for where "gh" occurred, which it does not contain: a fine-grained GitHub token in a
# text without "gh" elsewhere went out unredacted.) Each prefix starts at its rarest character,
# the rest checked behind it ("sk-" as "-(?<=sk-)"): the engine stops only at "-", "_", "A"
# and "x", where "s" and "g" stopped it at every tenth character of prose (half the
# instructions on long texts).
_API_HINT_BRANCHES = (
    r"-(?<=sk-)|_(?:live_|pat_(?<=github_pat_)|(?<=gh[pousr]_))|A(?:KIA|SIA|Iza)|xox"
)
_API_HINT = re.compile(_API_HINT_BRANCHES)
_LONG_NUMBER = re.compile(r"\d[\d \-]{11,}\d")
# "[A-Z]{2}\d{2}", written to start at the (rarer) digits so the engine skips ahead to them.
IBAN_HINT = re.compile(r"\d\d(?<=[A-Z]{2}\d\d)")
_PHONE_HINT = re.compile(r"\+\d")
#: Something every secret of every type contains (each type's hint above implies one of these),
#: so the usual text with none of them costs a substring test and a search or two: an "@"; a key,
#: JWT or key-block prefix (one search, as :data:`_API_HINT`: the fifteen substring tests it
#: replaced cost ~0.07 ms on 2,000 tokens holding none); or two digits at most one separator
#: apart (cards, IBANs and phone numbers have them).
_OTHER_HINTS = re.compile(rf"-----BEGIN|J(?<=eyJ)|{_API_HINT_BRANCHES}")  # (eyJ from its "J")
_DIGIT_PAIR = re.compile(r"[0-9][ \-]?[0-9]")
_DIGIT_PAIR_UNICODE = re.compile(r"\d[ \-]?\d")
#: :data:`_OTHER_HINTS` or :data:`_DIGIT_PAIR`, in one sweep of an ASCII text instead of two.
#: Each digit is a branch of its own: with every branch starting with a literal, the engine
#: skips ahead to the first characters of all of them (one "[0-9]" branch would make it try
#: the pattern at every position).
_HINT_OR_DIGIT_PAIR = re.compile(
    _OTHER_HINTS.pattern + "".join(f"|{d}[ \\-]?[0-9]" for d in "0123456789")
)
#: :data:`_OTHER_HINTS` or :data:`_LONG_NUMBER` (as "[0-9]" on ASCII text, faster) in one
#: sweep, each digit a branch of its own likewise: the output guard's types on an answer (in
#: process ~45% less time than the two searches on 66 characters, ~25% less on 1,900).
_HINT_OR_LONG_NUMBER = re.compile(
    _OTHER_HINTS.pattern + "".join(f"|{d}[0-9 \\-]{{11,}}[0-9]" for d in "0123456789")
)


#: The types whose hint is any two digits; of the others, only cards have digits.
_DIGIT_PAIR_TYPES = frozenset({"iban", "phone"})


def may_hold_secret(text: str, types: frozenset[str] | None) -> bool:
    """Whether ``text`` may hold a secret of one of ``types`` (of any type when None)."""
    if "@" in text:  # (the commonest, first)
        return True
    pairs = types is None or not types.isdisjoint(_DIGIT_PAIR_TYPES)
    if pairs and text.isascii():  # (the guard's prompts)
        return _HINT_OR_DIGIT_PAIR.search(text) is not None
    # Else digits only matter for cards (the output guard's usual types): a long number, not
    # just any two digits; a card's digits are 13 at least.
    cards = types is not None and not pairs and "credit_card" in types and len(text) >= 13
    if cards and text.isascii():  # (the output guard's answers)
        return _HINT_OR_LONG_NUMBER.search(text) is not None
    if _OTHER_HINTS.search(text) is not None:
        return True
    if types is not None and not pairs:
        return cards and _LONG_NUMBER.search(text) is not None
    # "\d" also matches non-ASCII digits, one Unicode category test per character: only needed
    # when there are non-ASCII characters (as here).
    return _DIGIT_PAIR_UNICODE.search(text) is not None


def may_contain(kind: str, text: str) -> bool:
    """Whether ``text`` may hold a secret of type ``kind``."""
    if kind == "private_key":
        return "-----BEGIN" in text
    if kind == "jwt":
        return "eyJ" in text
    if kind == "api_key":
        return _API_HINT.search(text) is not None
    if kind == "email":
        return "@" in text
    if kind == "credit_card":
        return _LONG_NUMBER.search(text) is not None
    if kind == "iban":
        return IBAN_HINT.search(text) is not None
    return _PHONE_HINT.search(text) is not None


#: The card prefilter (_LONG_NUMBER) or the IBAN hint, in one sweep: both start at a digit.
_CARD_OR_IBAN = re.compile(r"\d(?:(\d)(?<=[A-Z]{2}\d\d)|[\d \-]{11,}\d)")


def card_and_iban_hints(text: str) -> tuple[bool, bool]:
    """``(may_contain("credit_card", text), may_contain("iban", text))`` in one sweep of the
    text's digits where neither occurs (most texts), not two (~0.04 ms less on 2,000 tokens).
    The first match is the first position where either does; the other is then looked for
    from there (the IBAN branch, tried first, failed there when the long number matched)."""
    m = _CARD_OR_IBAN.search(text)
    if m is None:
        return False, False
    if m.group(1) is not None:
        return _LONG_NUMBER.search(text, m.start()) is not None, True
    return True, IBAN_HINT.search(text, m.start() + 1) is not None
