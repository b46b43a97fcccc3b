"""Normalisation before matching: one canonical form of the text, plus decoded hidden segments.

Attackers hide trigger phrases from naive matchers with fullwidth letters, Cyrillic or Greek
lookalikes, zero-width joiners, Unicode tag characters, leetspeak (``1gn0r3``), spaced-out letters
(``i g n o r e``) and encodings (base64, hex, rot13, %-escapes). :func:`fold` undoes the
character-level tricks; :func:`decoded_variants` returns the decoded payloads, which the scanner
folds and matches too. Both only feed the matchers: the text forwarded upstream is never changed
here.
"""

# ruff: noqa: RUF001
from __future__ import annotations

import base64
import binascii
import codecs
import functools
import re
import unicodedata
import urllib.parse
from collections.abc import Iterable

DECODERS = ("base64", "hex", "rot13", "url")

# Zero-width and invisible format characters, bidi controls, and the Unicode tag block (used to
# smuggle invisible ASCII, "ASCII smuggling").
_INVISIBLE = re.compile(
    "[\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180b-\u180f\u200b-\u200f\u202a-\u202e"
    "\u2060-\u206f\u3164\ufe00-\ufe0f\ufeff\uffa0\U000e0000-\U000e007f]"
)

# Lookalikes that NFKC leaves alone: Cyrillic and Greek letters that render like Latin ones, and
# a few symbols. Compact on purpose (the ones seen in real attacks), not the full Unicode
# confusables table.
_CONFUSABLES = {
    # Cyrillic lower/upper
    "а": "a", "в": "b", "е": "e", "ё": "e", "к": "k", "м": "m", "н": "h", "о": "o", "р": "p",
    "с": "c", "т": "t", "у": "y", "х": "x", "ѕ": "s", "і": "i", "ї": "i", "ј": "j", "ԁ": "d",
    "ԛ": "q", "ԝ": "w", "һ": "h", "ɡ": "g", "ӏ": "l", "ь": "b", "п": "n", "г": "r", "д": "d",
    "А": "a", "В": "b", "Е": "e", "К": "k", "М": "m", "Н": "h", "О": "o", "Р": "p", "С": "c",
    "Т": "t", "У": "y", "Х": "x", "Ѕ": "s", "І": "i", "Ј": "j", "П": "n", "Г": "r",
    # Greek lower/upper
    "α": "a", "β": "b", "γ": "y", "δ": "d", "ε": "e", "ζ": "z", "η": "n", "ι": "i", "κ": "k",
    "ν": "v", "ο": "o", "ρ": "p", "σ": "o", "ς": "s", "τ": "t", "υ": "u", "χ": "x", "ω": "w",
    "μ": "u", "λ": "l", "π": "n",
    "Α": "a", "Β": "b", "Ε": "e", "Ζ": "z", "Η": "h", "Ι": "i", "Κ": "k", "Μ": "m", "Ν": "n",
    "Ο": "o", "Ρ": "p", "Τ": "t", "Υ": "y", "Χ": "x",
    # Latin extensions and IPA lookalikes
    "ɑ": "a", "ɩ": "i", "ı": "i", "ȷ": "j", "ɪ": "i", "ʏ": "y", "ɴ": "n", "ʀ": "r", "ᴀ": "a",
    "ᴇ": "e", "ᴏ": "o", "ꜱ": "s", "ᴛ": "t", "ᴜ": "u",
    # Typographic punctuation folded to ASCII so patterns can use plain quotes and dashes.
    "‘": "'", "’": "'", "‚": "'", "“": '"', "”": '"', "„": '"', "–": "-", "—": "-", "−": "-",
}  # fmt: skip
_CONFUSABLE_TABLE = str.maketrans(_CONFUSABLES)

# Leetspeak, applied only inside tokens that also contain a letter, so "2024" or "10 GB" stay.
_LEET_TABLE = str.maketrans(
    {"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "8": "b", "9": "g", "@": "a",
     "$": "s", "€": "e", "!": "i", "+": "t"}
)  # fmt: skip
_LEET_CHARS = frozenset("013457890@$€!+")
# Only tokens mixing letters with leet characters reach the (Python-level) callback.
_TOKEN = re.compile(r"(?<![a-z0-9@$€!+])(?:[a-z]+[0-9@$€!+]|[0-9@$€!+]+[a-z])[a-z0-9@$€!+]*")
# "i g n o r e", "i.g.n.o.r.e", "i-g-n-o-r-e": four or more single letters with one separator.
_SPACED = re.compile(r"(?<![a-z])(?:[a-z][ .\-_*]){3,}[a-z](?![a-z])")
_SEPARATORS = re.compile(r"[ .\-_*]")
_WHITESPACE = re.compile(r"\s+")


def _leet_token(tok: str) -> str:
    # A trailing "!" is punctuation ("hello!"), not a letter.
    core = tok.rstrip("!+")
    if len(core) < 2 or not any(c.isalpha() for c in core):
        return tok
    if not any(c in _LEET_CHARS for c in core):
        return tok
    return core.translate(_LEET_TABLE) + tok[len(core) :]


def _leet(m: re.Match[str]) -> str:
    return _leet_token(m.group(0))


# _TOKEN matches exactly the maximal runs of [a-z0-9@$€!+] holding both a letter and a leet
# character; each such run has a leet character next to a letter, which this finds. Starting
# with a character class lets the engine skip to candidate characters instead of trying every
# position (see _fold_leet).
_TOKEN_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789@$€!+")
_LEET_HINT = re.compile(r"[0-9@$€!+](?:(?<=[a-z].)|(?=[a-z]))")
# Every _SPACED match contains "separator letter separator letter separator".
_SPACED_HINT = re.compile(r"[ .\-_*][a-z][ .\-_*][a-z][ .\-_*]")


def _fold_leet(s: str, spans: list[tuple[int, int]] | None = None) -> str:
    """``_TOKEN.sub(_leet, s)``, visiting only the runs around the hint's matches. Folding keeps
    lengths; ``spans`` (when given) receives the ``(start, end)`` of every run it changed."""
    m = _LEET_HINT.search(s)
    if m is None:
        return s
    out: list[str] = []
    last, n, chars = 0, len(s), _TOKEN_CHARS
    while m is not None:
        j = k = m.start()
        while j > 0 and s[j - 1] in chars:
            j -= 1
        while k < n and s[k] in chars:
            k += 1
        out.append(s[last:j])
        run = s[j:k]
        folded = _leet_token(run)
        out.append(folded)
        if spans is not None and folded != run:
            spans.append((j, k))
        last = k
        m = _LEET_HINT.search(s, k)
    out.append(s[last:])
    return "".join(out)


def light_reference(text: str) -> str:
    """:func:`light` step by step, as specified (slow; the tests check :func:`light` against it)."""
    if text.isascii():
        s = text.lower()
    else:
        s = unicodedata.normalize("NFKC", text)
        s = _INVISIBLE.sub("", s)
        s = s.translate(_CONFUSABLE_TABLE).casefold()
        # Casefolding can produce further lookalikes (e.g. upper-case Greek).
        s = s.translate(_CONFUSABLE_TABLE)
    return _WHITESPACE.sub(" ", s)


@functools.cache
def _fold_table() -> tuple[list[int | str | None], re.Pattern[str]]:
    """One translate table for the Basic Multilingual Plane doing what :func:`light_reference`
    does in three passes (invisible removal, lookalikes, lookalikes again after casefolding),
    and a regex finding the characters it changes.

    A list indexed by code point, not a dict: ``str.translate`` raises and clears a KeyError for
    every character a dict lacks, which made it the slowest step. Built on first use (~20 ms)."""
    table: list[int | str | None] = list(range(0x10000))
    changed: list[str] = []
    for cp in range(0x10000):
        c = chr(cp)
        if _INVISIBLE.match(c):
            table[cp] = None
        elif c in _CONFUSABLES:
            table[cp] = _CONFUSABLES[c]
        else:
            # Characters whose casefolding yields a lookalike (e.g. upper-case Greek): map them
            # to the folded, translated form now (casefolding it again changes nothing).
            f = c.casefold()
            if f == c or not any(ch in _CONFUSABLES for ch in f):
                continue
            g = f.translate(_CONFUSABLE_TABLE)
            assert g.casefold() == g, c
            table[cp] = g
        changed.append(c)
    cls = "".join(re.escape(c) for c in changed)
    return table, re.compile(f"[{cls}]")


def _collapse(s: str) -> str:
    """``re.sub(r"\\s+", " ", s)`` (str.split uses the same definition of whitespace)."""
    parts = s.split()
    if not parts:
        return " " if s else ""
    out = " ".join(parts)
    if s[0].isspace():
        out = " " + out
    if s[-1].isspace():
        out += " "
    return out


# A stretch of non-ASCII text, with up to 8 ASCII characters between two non-ASCII ones so that a
# Cyrillic passage is one stretch, not one per word. light() adds the character before it (NFKC
# composes "e" + U+0301). ASCII characters are stable under NFKC (they never compose with what
# precedes them), so normalising each stretch on its own gives the same text as normalising the
# whole. Starting with a character class lets the engine skip ahead to candidates.
_NON_ASCII = re.compile(r"[^\x00-\x7f](?:[\x00-\x7f]{0,8}[^\x00-\x7f])*")
#: Beyond this many stretches, one pass over the whole text is cheaper.
_MAX_STRETCHES = 32
_ASTRAL = re.compile("[\U00010000-\U0010ffff]")


def _fold_unicode(s: str) -> str:
    """The Unicode steps of :func:`light_reference`, before the whitespace collapse."""
    s = unicodedata.normalize("NFKC", s)
    table, changes = _fold_table()
    first = changes.search(s)
    if first is not None:
        # Translate only the span holding changed characters (often one pasted passage of a
        # long prompt): translate works character by character, so this is the same.
        end = len(s) - changes.search(s[::-1]).start()  # type: ignore[union-attr]
        s = s[: first.start()] + s[first.start() : end].translate(table) + s[end:]
    if _ASTRAL.search(s) is not None:
        s = _INVISIBLE.sub("", s)  # tag characters are outside the table's plane
    return s.casefold()


def light(text: str) -> str:
    """NFKC, invisible characters removed, lookalikes and case folded, whitespace collapsed."""
    if text.isascii():
        # Fast path: ASCII needs none of the Unicode steps. Printable ASCII holds no whitespace
        # but " ", so without two spaces in a row there is nothing to collapse either.
        low = text.lower()
        if "  " not in low and low.isprintable():
            return low
        return _collapse(low)
    # Most prompts are ASCII with a few curly quotes, dashes or emoji: only those stretches go
    # through the Unicode steps; the ASCII between them is only lower-cased.
    out: list[str] = []
    last = 0
    for i, m in enumerate(_NON_ASCII.finditer(text)):
        if i == _MAX_STRETCHES:
            return _collapse(_fold_unicode(text))
        start = max(m.start() - 1, last)
        out.append(text[last:start].lower())
        out.append(_fold_unicode(text[start : m.end()]))
        last = m.end()
    out.append(text[last:].lower())
    return _collapse("".join(out))


def _spaced(s: str, joins: list[tuple[int, int, int, int]] | None) -> str:
    """``_SPACED.sub(<separators removed>, s)``, tried only where :data:`_SPACED_HINT` matches
    (every match holds one, starting at its second character). ``joins`` (when given) receives
    each joined word's extent in ``s`` and in the result: ``(start, end, new_start, new_end)``."""
    h = _SPACED_HINT.search(s)
    if h is None:
        return s
    out: list[str] = []
    last = size = 0
    while h is not None:
        m = _SPACED.match(s, h.start() - 1) if h.start() > 0 else None
        if m is None:
            h = _SPACED_HINT.search(s, h.start() + 1)
            continue
        out.append(s[last : m.start()])
        size += m.start() - last
        word = _SEPARATORS.sub("", m.group(0))
        out.append(word)
        if joins is not None:
            joins.append((m.start(), m.end(), size, size + len(word)))
        size += len(word)
        last = m.end()
        h = _SPACED_HINT.search(s, last)
    out.append(s[last:])
    return "".join(out)


def deobfuscate(lit: str) -> str:
    """Leetspeak and spaced-out letters folded, on the output of :func:`light`."""
    return _spaced(_fold_leet(lit), None)


def deobfuscate_spans(lit: str) -> tuple[str, list[tuple[int, int]]]:
    """:func:`deobfuscate`, and the ``(start, end)`` spans of the result that differ from
    ``lit`` (folded leetspeak runs, joined spaced-out words), sorted and merged. Outside them
    the result is ``lit``'s text, shifted left by the joins before it."""
    leet: list[tuple[int, int]] = []
    s = _fold_leet(lit, leet)
    joins: list[tuple[int, int, int, int]] = []
    out = _spaced(s, joins)
    if not joins:
        return out, leet

    def where(p: int) -> int:
        """Position ``p`` of ``s`` in the result (inside a join: that join's word)."""
        shift = 0
        for a, b, na, nb in joins:
            if p < a:
                break
            if p < b:
                return min(na + (p - a), nb)
            shift = b - nb
        return p - shift

    spans = [(where(a), where(b)) for a, b in leet] + [(na, nb) for _, _, na, nb in joins]
    merged: list[tuple[int, int]] = []
    for a, b in sorted(spans):
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return out, merged


def deobfuscate_reference(lit: str) -> str:
    """:func:`deobfuscate` as specified (slow; the tests check the fast one against it)."""
    s = _TOKEN.sub(_leet, lit)
    return _SPACED.sub(lambda m: _SEPARATORS.sub("", m.group(0)), s)


def fold(text: str) -> str:
    """The full matching form: :func:`light` then :func:`deobfuscate`."""
    return deobfuscate(light(text))


def variants(text: str) -> list[str]:
    """The forms rules are matched against: the light form, and the deobfuscated one when it
    differs (leetspeak folding would break literal patterns such as ``<|im_start|>``)."""
    lit = light(text)
    full = deobfuscate(lit)
    return [lit] if full == lit else [lit, full]


# --- decoding of embedded segments -------------------------------------------------------------

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
    look-arounds see whitespace, outside both classes, at a word's edges)."""
    return [w for w in text.split() if len(w) >= 16]


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
    cost of one split and one search."""
    return (
        "%" in text
        or any(len(w) >= 16 for w in text.split())
        or _HEX_PAIRS_HINT.search(text) is not None
    )


def _byte_classes(classes: dict[bytes, bytes], other: bytes) -> bytes:
    table = bytearray(other * 256)
    for chars, cls in classes.items():
        for c in chars:
            table[c] = cls[0]
    return bytes(table)


#: ASCII characters by what the quick exits of :func:`ascii_clues` look for: "a" a letter of
#: ``lit`` ([a-z]), "d" a character leetspeak folds (``[0-9@$!+]``), " " a separator of
#: spaced-out letters (``[ .\-_*]``), "x" anything else.
_SHAPE = _byte_classes(
    {b"abcdefghijklmnopqrstuvwxyz": b"a", b"0123456789@$!+": b"d", b" .-_*": b" "}, b"x"
)
#: Whitespace (" ") against anything else ("w").
_BLANKS = _byte_classes({b" \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f": b" "}, b"w")
_LONG_WORD = "w" * 16


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
    shape = raw.translate(_SHAPE).decode("ascii")
    leet = "d" in shape  # most prompts have no digit at all
    deobfuscate = (leet and ("ad" in shape or "da" in shape)) or " a a " in shape
    decode = (
        "%" in lit
        or _LONG_WORD in raw.translate(_BLANKS).decode("ascii")
        or (leet and _HEX_PAIRS_HINT.search(text) is not None)
    )
    return deobfuscate, decode


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
