"""Text hidden in characters a reader does not see, decoded so the matchers and the
classifier read it: Unicode tag characters ("ASCII smuggling"), runs of variation selectors
("emoji smuggling"), and blank-looking letters between words."""

from __future__ import annotations

import re

# The printable ASCII of the Unicode tag block (U+E0020-U+E007E): invisible, yet some models
# read it as the ASCII it shadows ("ASCII smuggling"). Decoded, not dropped, so the matchers see
# the hidden text; spaces around it keep it from gluing onto the visible words.
TAG_RUN = re.compile("[\U000e0020-\U000e007e]+")


def untag(m: re.Match[str]) -> str:
    return " " + "".join(chr(ord(c) - 0xE0000) for c in m.group(0)) + " "


#: Two or more variation selectors in a row: one byte each (U+FE00-FE0F: 0-15, U+E0100-E01EF:
#: 16-255), the "emoji smuggling" encoding of hidden text. (One alone is how emoji choose their
#: presentation, "❤️".)
VS_RUN = re.compile("[\ufe00-\ufe0f\U000e0100-\U000e01ef]{2,}")


def unvs(m: re.Match[str]) -> str:
    data = bytes(ord(c) - 0xFE00 if ord(c) <= 0xFE0F else ord(c) - 0xE0100 + 16 for c in m.group(0))
    try:
        hidden = data.decode("utf-8")
    except UnicodeDecodeError:
        return m.group(0)
    return " " + hidden + " " if hidden.isprintable() else m.group(0)


#: Blank-looking letters, as the spaces a reader sees (for the classifier, which reads the text
#: itself; the matchers' folding maps them the same way).
_BLANKS = str.maketrans(dict.fromkeys("\u115f\u1160\u3164\uffa0\u2800", " "))


def reveal_tags(text: str) -> str:
    """``text`` with hidden payloads decoded: runs of tag characters as the ASCII they encode,
    runs of variation selectors as the bytes they encode; blank-looking letters as spaces."""
    if text.isascii():
        return text
    text = TAG_RUN.sub(untag, text).translate(_BLANKS)
    return VS_RUN.sub(unvs, text) if VS_RUN.search(text) else text
