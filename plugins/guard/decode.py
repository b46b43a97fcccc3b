"""Decoding of segments hidden in a prompt: base64, hex, %-escapes and rot13.

:func:`decoded_variants` returns the decoded payloads, which the scanner folds
(``plugins.guard.normalize``) and matches too. Nothing here changes the text forwarded upstream.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import re
import urllib.parse
from collections.abc import Iterable

from plugins.guard.shapes import BLANKS, SHAPE, classes

DECODERS = ("base64", "hex", "rot13", "url")

# The look-behinds make the engine try only at the start of a run (not inside every word).
_B64 = re.compile(r"(?<![A-Za-z0-9+/_-])[A-Za-z0-9+/_-]{16,}={0,2}")
_HEX = re.compile(
    r"(?<![0-9A-Za-z])(?:[0-9a-fA-F]{16,}|(?:\\x[0-9a-fA-F]{2}){8,}"
    r"|(?:(?:0x)?[0-9a-fA-F]{2}[\s:,]){7,}(?:0x)?[0-9a-fA-F]{2})(?![0-9A-Za-z])"
)
_HEX_STRIP = re.compile(r"0x|\\x|[\s:,]")
_PCT = re.compile(r"%[0-9a-fA-F]{2}")
_ROT13_HINT = re.compile(r"rot[\s\-_]?13|caesar|cipher", re.IGNORECASE)
_ROT13_HINT_LOWER = re.compile(r"rot[\s\-_]?13|caesar|cipher")
# The only non-ASCII characters that match ASCII letters under re.IGNORECASE or lower-case to
# ASCII (checked over all of Unicode by the tests): only with them is lower() not enough.
_CASE_SPECIAL = re.compile("[\u0130\u0131\u017f\u212a]")
# Separated hex pairs ("69 67 6e ...") span words, so finding them takes a sweep of the whole
# text. It is done only when three pairs in a row encode ASCII-range bytes (first digit 0-7), as
# any hex-encoded English payload has: starting with a digit, this search skips prose quickly
# (one starting at every space or comma cost a tenth of a millisecond on 2,000 tokens).
_HEX_PAIRS_HINT = re.compile(
    r"[0-7][0-9a-fA-F][\s:,](?:0x)?[0-7][0-9a-fA-F][\s:,](?:0x)?[0-7][0-9a-fA-F]"
)
#: Cap on decoded segments per text, so a crafted prompt cannot make the scan expensive.
MAX_SEGMENTS = 16
#: Texts longer than this are only rot13-decoded when they mention rot13 (cost control).
ROT13_ALWAYS_BELOW = 4096
#: %-escapes are decoded with this many characters of context on each side (escapes closer
#: than twice this share one segment), not the whole text: a URL in a long document costs a
#: few hundred characters of matching, not a second pass over the document.
URL_CONTEXT = 256


def _printable(raw: bytes) -> str | None:
    try:
        s = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if not s:
        return None
    good = sum(1 for c in s if c.isprintable() or c in "\n\r\t")
    # Random bytes (images, hashes) decode to mostly control characters: skip those.
    return s if good / len(s) >= 0.9 and any(c.isalpha() for c in s) else None


def _b64(seg: str) -> str | None:
    seg = seg.rstrip("=")
    if len(seg) % 4 == 1:
        return None
    # Pure hex or pure letters are far more often identifiers than base64.
    if seg.isalpha() or all(c in "0123456789abcdefABCDEF" for c in seg):
        return None
    padded = seg + "=" * (-len(seg) % 4)
    try:
        if "-" in seg or "_" in seg:
            raw = base64.urlsafe_b64decode(padded)
        else:
            raw = base64.b64decode(padded, validate=True)
    except (binascii.Error, ValueError):
        return None
    return _printable(raw)


def _hex(seg: str) -> str | None:
    digits = _HEX_STRIP.sub("", seg)
    if len(digits) % 2:
        digits = digits[:-1]
    try:
        return _printable(bytes.fromhex(digits))
    except ValueError:
        return None


def _mentions_rot13(text: str) -> bool:
    """``_ROT13_HINT.search(text)``, without the slow case-insensitive engine in most cases."""
    low = text.lower()
    if "caesar" in low or "cipher" in low or ("rot" in low and _ROT13_HINT_LOWER.search(low)):
        return True
    if text.isascii() or not _CASE_SPECIAL.search(text):
        return False
    return _ROT13_HINT.search(text) is not None


def _long_words(text: str) -> list[str]:
    """Whitespace-free runs of 16+ characters, in order. Base64 and unseparated hex contain no
    whitespace, so their matches in the text are exactly their matches in these words (the
    look-arounds see whitespace, outside both classes, at a word's edges).

    ``[w for w in text.split() if len(w) >= 16]``, without a Python step per word (~0.1 ms on
    2,000 tokens): only the runs of :func:`_blank_shape` holding 16 non-blanks in a row are
    split. Each word of the text lies inside one such run (the shape's blanks are whitespace
    to ``str.split`` too), and splitting a run gives exactly the words inside it."""
    shape = _blank_shape(text)
    i = shape.find(_LONG_WORD)
    if i == -1:
        return []
    out: list[str] = []
    while i != -1:
        lo = shape.rfind(" ", 0, i) + 1
        hi = shape.find(" ", i)
        if hi == -1:
            hi = len(shape)
        out += [w for w in text[lo:hi].split() if len(w) >= 16]
        i = shape.find(_LONG_WORD, hi)
    return out


# What a run of separated hex pairs is made of.
_HEX_RUN = re.compile(r"[0-9a-fA-Fx\s:,]+")
_HEX_RUN_CHARS = frozenset("0123456789abcdefABCDEFx:, \t\n\r\f\v")
#: How far before a hint a run of separated pairs is looked for.
_HEX_LOOKBACK = 600


def _hex_pair_regions(text: str) -> list[tuple[int, int]]:
    """``(start, end)`` ranges to sweep for separated hex pairs: the run of hex digits,
    separators and "0x" around each :data:`_HEX_PAIRS_HINT` match (at most
    :data:`_HEX_LOOKBACK` characters before it), plus the character after the run, so that the
    pattern's look-ahead sees the real text."""
    out: list[tuple[int, int]] = []
    h = _HEX_PAIRS_HINT.search(text)
    while h is not None:
        lo = h.start()
        floor = max(0, lo - _HEX_LOOKBACK)
        while lo > floor and text[lo - 1] in _HEX_RUN_CHARS:
            lo -= 1
        end = _HEX_RUN.match(text, h.start()).end()  # type: ignore[union-attr]
        out.append((lo, min(len(text), end + 1)))
        h = _HEX_PAIRS_HINT.search(text, end)
    return out


def _url_segments(text: str) -> list[str]:
    """Each cluster of %-escapes decoded with :data:`URL_CONTEXT` characters around it ("+" read
    as a space), when the text holds at least three escapes."""
    starts = [m.start() for m in _PCT.finditer(text)]
    if len(starts) < 3:
        return []
    out: list[str] = []
    first = last = starts[0]
    for p in [*starts[1:], -1]:
        if p != -1 and p - last <= 2 * URL_CONTEXT:
            last = p
            continue
        seg = text[max(0, first - URL_CONTEXT) : last + 3 + URL_CONTEXT]
        decoded = urllib.parse.unquote(seg.replace("+", " "))
        if decoded != seg:
            out.append(decoded)
        first = last = p
    return out


def rot13_windows(text: str, lit: str) -> list[tuple[int, int]]:
    """Where in ``lit`` (``light(text)``) the scanner matches rules against its rot13: all of it
    for texts under :data:`ROT13_ALWAYS_BELOW` characters; otherwise :data:`ROT13_CONTEXT`
    characters either side of each mention of rot13, a Caesar shift or a cipher (looked for in
    the folded form, so lookalike letters count), or nowhere."""
    if len(text) < ROT13_ALWAYS_BELOW:
        return [(0, len(lit))]
    # Three searches with literal starts: one alternation would try every "r" and "c".
    spans = [m.span() for m in _ROT13_MENTION.finditer(lit)]
    for word in ("caesar", "cipher"):
        i = lit.find(word)
        while i != -1:
            spans.append((i, i + len(word)))
            i = lit.find(word, i + 1)
    out: list[tuple[int, int]] = []
    for a, b in sorted(spans):
        lo, hi = max(0, a - ROT13_CONTEXT), min(len(lit), b + ROT13_CONTEXT)
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], hi)
        else:
            out.append((lo, hi))
    return out


#: A long text's rot13 is matched this many characters around each mention of rot13.
ROT13_CONTEXT = 512
_ROT13_MENTION = re.compile(r"rot[ \-_]?13")


def _decode_once(text: str, kinds: Iterable[str]) -> list[str]:
    out: list[str] = []
    words: list[str] | None = None  # computed on first need
    for kind in kinds:
        if kind in ("base64", "hex") and words is None:
            words = _long_words(text)
        if kind == "base64":
            for w in words or ():
                # Runs of letters alone are never decoded (see _b64): skip such words.
                if w.isalpha():
                    continue
                for m in _B64.finditer(w):
                    s = _b64(m.group(0))
                    if s:
                        out.append(s)
        elif kind == "hex":
            found = [s for w in words or () for m in _HEX.finditer(w) if (s := _hex(m.group(0)))]
            # Separated pairs ("69 67 6e ...") span words: sweep the runs of hex-ish characters
            # around each hint (a match there may also lie in a long word: counted once).
            for lo, hi in _hex_pair_regions(text):
                found += [s for m in _HEX.finditer(text, lo, hi) if (s := _hex(m.group(0)))]
            out.extend(dict.fromkeys(found))
        elif kind == "url":
            if "%" in text:
                out.extend(_url_segments(text))
        elif kind == "rot13":
            if len(text) < ROT13_ALWAYS_BELOW or _mentions_rot13(text):
                out.append(codecs.encode(text, "rot13"))
        if len(out) >= MAX_SEGMENTS:
            break
    return out[:MAX_SEGMENTS]


def _may_decode(text: str) -> bool:
    """Whether base64, hex or %-escapes could be found at all: a word of 16+ characters (base64,
    unseparated hex), a hint of separated hex pairs, or a "%". False for most prompts, at the
    cost of one translation and one search."""
    return "%" in text or bool(_long_words(text)) or _HEX_PAIRS_HINT.search(text) is not None


_LONG_WORD = "w" * 16


def _blank_shape(text: str) -> str:
    """``text`` as :data:`BLANKS` classes, one character each: " " for ASCII whitespace, "w"
    for anything else, a non-ASCII character included (``str.split`` also splits at a few
    non-ASCII spaces: the shape's runs of "w" hold the text's words, and may join some)."""
    return classes(text, BLANKS)


def ascii_clues(text: str, lit: str) -> tuple[bool, bool]:
    """For an ASCII ``text`` and ``lit = light(text)``: whether :func:`deobfuscate_spans` may
    change ``lit``, and whether :func:`decoded_variants` without rot13 may find anything. False
    means it would not (exactly: each is the same test as the regex it stands for, made on a
    string of character classes with substring searches, ~5x cheaper than those regexes).

    * leetspeak (:data:`_LEET_HINT`): a leet character next to a letter, "ad" or "da";
    * spaced-out letters (:data:`_SPACED_HINT`): " a a ";
    * decoding (:func:`_may_decode`): a "%", a run of 16 characters without whitespace (``lit``
      has the words of ``text``, lower-cased, between collapsed whitespace), or a digit, where
      the exact test for separated hex pairs then runs on ``text``."""
    raw = lit.encode("ascii")
    shape = raw.translate(SHAPE).decode("ascii")
    leet = "d" in shape  # most prompts have no digit at all
    deobfuscate = (leet and ("ad" in shape or "da" in shape)) or " a a " in shape
    decode = (
        "%" in lit
        or _LONG_WORD in raw.translate(BLANKS).decode("ascii")
        or (leet and _HEX_PAIRS_HINT.search(text) is not None)
    )
    return deobfuscate, decode


def may_deobfuscate(lit: str) -> bool:
    """Whether :func:`deobfuscate_spans` may change ``lit`` (a :func:`light` form, ASCII or
    not): the first test of :func:`ascii_clues`, with every non-ASCII character but the one
    leetspeak folds ("€") as "anything else"."""
    if "€" in lit:
        return True
    shape = classes(lit, SHAPE)
    return ("d" in shape and ("ad" in shape or "da" in shape)) or " a a " in shape


def decoded_variants(text: str, kinds: Iterable[str] = DECODERS, depth: int = 2) -> list[str]:
    """Decoded payloads hidden in ``text`` (base64 of hex, etc. up to ``depth`` levels)."""
    kinds = tuple(kinds)
    if "rot13" not in kinds and not _may_decode(text):
        return []
    found: list[str] = []
    frontier = [text]
    for _ in range(depth):
        nxt: list[str] = []
        for t in frontier:
            # rot13 of a decoded payload is noise; only the original text gets it.
            ks = kinds if t is text else tuple(k for k in kinds if k != "rot13")
            nxt.extend(_decode_once(t, ks))
        found.extend(nxt)
        if len(found) >= MAX_SEGMENTS or not nxt:
            break
        frontier = nxt
    return found[:MAX_SEGMENTS]
