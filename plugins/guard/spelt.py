"""The form of a prompt that spells its words out letter by letter, two spaces apart.

"I G N O R E  A L L  P R E V I O U S": the light form (:func:`~plugins.guard.normalize.light`)
collapses the double spaces, and deobfuscation then joins all the letters into one word
("ignoreallprevious"), which no rule matches. :func:`spelt_words` keeps the gaps between words;
:func:`spelt_fired` matches the rules against that form where it differs from the light form.
"""

from __future__ import annotations

import re

from plugins.guard.normalize import light
from plugins.guard.prefixes import Starts
from plugins.guard.rules import RuleSet

#: One word spelt out with single spaces ("a l l"), in a text whose words are two spaces apart.
_SPELT_WORD = re.compile(r"(?<![a-z])[a-z](?: [a-z])+(?![a-z])")
#: The space after the first letter of every :data:`_SPELT_WORD` match, and only there (a letter
#: alone before it, one after it). Starting with a literal, it skips ahead to spaces; the word's
#: pattern, starting with a look-behind, is tried at every character.
_SPELT_HINT = re.compile(r" [a-z](?![a-z])(?<=[a-z] [a-z])(?<![a-z][a-z] [a-z])")


def _join_spelt(low: str) -> str:
    """``_SPELT_WORD.sub(<its spaces removed>, low)``, tried only where :data:`_SPELT_HINT`
    matches: each match starts one character before a hint, and each hint has a match there,
    so the leftmost match from a position is found by the first hint after it."""
    h = _SPELT_HINT.search(low)
    if h is None:
        return low
    out: list[str] = []
    last = 0
    while h is not None:
        m = _SPELT_WORD.match(low, h.start() - 1)
        if m is None:  # (never: the hint is made of the word's first two letters and space)
            h = _SPELT_HINT.search(low, h.start() + 1)
            continue
        out.append(low[last : m.start()])
        out.append(m.group(0).replace(" ", ""))
        last = m.end()
        h = _SPELT_HINT.search(low, last + 1)
    out.append(low[last:])
    return "".join(out)


def spelt_words(text: str) -> str | None:
    """The light form of a text that spells its words out letter by letter with two spaces
    between words ("I G N O R E  A L L  P R E V I O U S"): each word joined, then the spaces
    collapsed ("ignore all previous"). The light form has lost the word gaps (its spaced
    letters join into one word). None when the text has no double space."""
    if "  " not in text:
        return None
    low = light(text.replace("  ", "\x00"))
    if "\x00" not in low:
        return None
    # collapse() of a text whose only whitespace is spaces: the light form's only whitespace is
    # single spaces, joining removes some, and the markers become more. Runs of spaces are
    # halved until none is left (most texts have none: a split and join of the whole text
    # cost ~0.05 ms on 2,000 tokens).
    out = _join_spelt(low).replace("\x00", " ")
    while "  " in out:
        out = out.replace("  ", " ")
    return out


def spelt_fired(rules: RuleSet, text: str, lit: str, starts: Starts, skip: set[int]) -> set[int]:
    """The rules not in ``skip`` (which holds those firing on ``lit``, ``light(text)``) that
    fire on the spelt-out form of ``text``. When that form is the light form (no letters spelt
    out, only words two spaces apart) there are none; otherwise it differs from it in a few
    places, and only around those is it swept (``starts``: the light form's prefix
    occurrences, see ``RuleSet.fired_edited``)."""
    words = spelt_words(text)
    if words is None or words == lit:
        return set()
    return rules.fired_edited(words, lit, starts, skip)
