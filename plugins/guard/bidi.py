"""Bidi controls in answers: what the client displays must be what the output guard read.

A model can write a key or the canary reversed inside RIGHT-TO-LEFT OVERRIDE ... POP
DIRECTIONAL FORMATTING (or an isolate, or split in pieces put in reverse order around
RIGHT-TO-LEFT MARKs in a right-to-left paragraph): the text the guard reads holds no key, the
screen shows one. Rather than reproduce the Unicode bidi algorithm to read the displayed form
too, the guard removes what reorders Latin text from answers, so the display order of the text
it read is its logical order:

* the explicit embeddings, overrides and isolates (U+202A-U+202E, U+2066-U+2069), always: they
  are rare in honest text, and without them the text still reads (in its natural direction);
* the marks (U+200E LRM, U+200F RLM, U+061C ALM) only where they are glued inside a word of
  Latin letters, digits and punctuation (neither neighbour a space or right-to-left, letters
  or digits on both sides): there a mark only reorders the word's pieces. Hebrew and Arabic
  text uses marks next to its own letters, spaces and numbers, or between punctuation and a
  word's end ("(test)<RLM>."), where they stay.
"""

from __future__ import annotations

import re
import unicodedata

#: Embeddings, overrides and isolates: LRE, RLE, PDF, LRO, RLO and LRI, RLI, FSI, PDI.
_EXPLICIT = re.compile("[\u202a-\u202e\u2066-\u2069]+")
#: A run of directional marks (with any other invisible characters around them).
_INVISIBLE = "\u200b-\u200f\u061c\u2060-\u2064\ufeff"
_MARKS = re.compile(f"[{_INVISIBLE}]*[\u200e\u200f\u061c][{_INVISIBLE}]*")
#: Any character this module may remove: the cheap test before any work.
_ANY = re.compile("[\u202a-\u202e\u2066-\u2069\u200e\u200f\u061c]")
_RTL = frozenset({"R", "AL", "AN"})


def _keeps_order(c: str) -> bool:
    """Whether a mark next to ``c`` may stay: a space, a right-to-left letter or digit."""
    return c.isspace() or unicodedata.bidirectional(c) in _RTL


def _mark_run(m: re.Match[str]) -> str:
    """A run of marks, without its marks where they could reorder two pieces of a word: both
    neighbours are neither spaces nor right-to-left, and the text runs on to a letter or digit
    on each side before a space ("3a9c.<RLM>CANARY-7f" shows as "CANARY-7f.3a9c" in a
    right-to-left paragraph; "(test)<RLM>." keeps its mark). A stream's text is held back to
    its last space (the output guard's rules), so the end of a piece is the end of a word."""
    text, start, end = m.string, m.start(), m.end()
    if (start > 0 and _keeps_order(text[start - 1])) or (
        end < len(text) and _keeps_order(text[end])
    ):
        return m.group(0)
    if not (_runs_to_alnum(text, start - 1, -1) and _runs_to_alnum(text, end, 1)):
        return m.group(0)
    return m.group(0).translate(_NO_MARKS)


def _runs_to_alnum(text: str, i: int, step: int) -> bool:
    """Whether, from ``text[i]`` in the direction ``step``, a letter or digit comes before a
    space or the end of the text."""
    while 0 <= i < len(text):
        c = text[i]
        if c.isalnum():
            return True
        if c.isspace():
            return False
        i += step
    return False


_NO_MARKS = str.maketrans(dict.fromkeys("\u200e\u200f\u061c"))
#: Every bidi control, explicit or mark: removed from logprobs tokens, whose neighbours are in
#: other tokens.
_ALL_BIDI = str.maketrans(dict.fromkeys("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
                                        "\u200e\u200f\u061c"))  # fmt: skip


def has_bidi(text: str) -> bool:
    """Whether ``text`` holds a bidi control (ASCII text, the usual, costs one test)."""
    return not text.isascii() and _ANY.search(text) is not None


def strip_bidi(text: str) -> str:
    """``text`` without the bidi controls that would make its display differ from its
    logical order (see the module's docstring); itself when it has none."""
    if not has_bidi(text):
        return text
    text = _EXPLICIT.sub("", text)
    return _MARKS.sub(_mark_run, text)


def strip_all_bidi(text: str) -> str:
    """``text`` without any bidi control (for tokens, which are pieces of a text)."""
    return text.translate(_ALL_BIDI) if has_bidi(text) else text
