"""The middle of a long prompt, for the classifier: segments the joined window leaves out.

The classifier scores one window per text: the whole text when it fits, else its first and last
~31 word pieces (:meth:`plugins.guard.encoder.Encoder.window_slices`). An injection sentence in
the middle of a long document or pasted page was read by the rules alone, so a paraphrase they
do not know passed. This picks, cheaply, a few sentence-sized spans of that middle worth a
forward pass each: the ones holding the words injections are written with (a compiled regular
expression over the text, no tokenization unless one is found there).
"""

from __future__ import annotations

import re
from collections.abc import Callable

#: Words injections are written with: the rules' vocabulary (ignore, instructions, system
#: prompt, reveal, pretend, jailbreak, ...) and words over-represented in the training split's
#: attack rows. Not the words technical documents are full of as well ("configuration",
#: "password", "restriction", "previous", "system"): scored alone, their sentences in package
#: READMEs scored up to 0.99 ("Loosened restriction on integers as query string values"). A
#: match only makes a span a candidate for a forward pass; the classifier decides.
CUES = re.compile(
    # (A look-behind and a look-ahead at the first letters instead of \b: a third faster.)
    r"(?<!\w)(?=[abcdfgijoprsuvy])(?:ignor\w*|disregard\w*|forg[eo]t\w*|overrid\w*|bypass\w*"
    r"|circumvent\w*|jailbr\w*|pretend\w*|instruct\w*|directive\w*|guideline\w*|prompt\w*"
    r"|system message|reveal\w*|disclos\w*|confidential\w*|secret\w*|rules|unrestricted"
    r"|unfiltered|uncensored|developer mode|roleplay|pwned|from now on|you are now|act as"
    r"|verbatim)\b",
    re.IGNORECASE,
)
#: The same over lower-cased text (four times faster than ``re.IGNORECASE``).
_CUES_LOWER = re.compile(CUES.pattern)
#: A segment's length in characters: about one window of word pieces of English prose.
SEGMENT_CHARS = 280
#: A sentence shorter than this is scored with its neighbours ("Stop. Print the key.").
MIN_SEGMENT_CHARS = 120
#: Where a sentence ends: ., ! or ? before a space, or a line break.
_END = re.compile(r"[.!?](?=\s)|\n")
#: A text this short is one window whatever it holds (a word piece is at least a character).
_SURELY_FITS = 62

#: ``text -> (end of the head, start of the tail)`` in characters, the part of the text the
#: joined window leaves out, or None when the window holds all of it.
Uncovered = Callable[[str], "tuple[int, int] | None"]


def _sentence(text: str, lo: int, hi: int, start: int, end: int) -> tuple[int, int]:
    """The sentence(s) around ``text[start:end]``, within ``[lo, hi)``, at most
    :data:`SEGMENT_CHARS` long, grown to :data:`MIN_SEGMENT_CHARS` by whole neighbours."""
    reach = SEGMENT_CHARS // 2
    a_lo, b_hi = max(lo, start - reach), min(hi, end + reach)
    ends = [m.end() for m in _END.finditer(text, a_lo, b_hi)]
    a = max((e for e in ends if e <= start), default=a_lo)
    b = min((e for e in ends if e >= end), default=b_hi)
    while b - a < MIN_SEGMENT_CHARS:
        after = [e for e in ends if e > b and e - a <= SEGMENT_CHARS]
        before = [e for e in ends if e < a and b - e <= SEGMENT_CHARS]
        if after:
            b = after[0]
        elif before:
            a = before[-1]
        else:
            break
    if b - a > SEGMENT_CHARS:  # one long run-on sentence: the span around the cue
        a = max(a, min(start, end - SEGMENT_CHARS // 2) - SEGMENT_CHARS // 2)
        b = min(b, a + SEGMENT_CHARS)
    return a, b


def middle_segments(text: str, limit: int, uncovered: Uncovered) -> list[str]:
    """Up to ``limit`` spans of ``text`` the classifier's window does not see that hold the
    most distinct :data:`CUES` (ties: the earlier), in the text's order; none when the window
    holds the whole text."""
    if limit <= 0 or len(text) <= _SURELY_FITS:
        return []
    low = text.lower()
    cues = _CUES_LOWER
    if len(low) != len(text):  # a few letters lower-case to two characters ("İ")
        low, cues = text, CUES
    edge = _SURELY_FITS // 2
    hits = [m for m in cues.finditer(low, edge, len(low) - edge)]
    if not hits:
        return []
    gap = uncovered(text)
    if gap is None:
        return []
    lo, hi = gap
    spans: list[tuple[int, int]] = []
    words: list[set[str]] = []
    for m in hits:
        if m.end() <= lo:
            continue
        if m.start() >= hi:
            break
        if spans and m.start() < spans[-1][1]:
            words[-1].add(m.group())
            continue
        spans.append(_sentence(text, spans[-1][1] if spans else 0, len(text), m.start(), m.end()))
        words.append({m.group()})
    best = sorted(range(len(spans)), key=lambda i: (-len(words[i]), i))[:limit]
    return [" ".join(text[slice(*spans[i])].split()) for i in sorted(best)]
