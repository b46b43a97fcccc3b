"""Normalisation before matching: one canonical form of the text.

Attackers hide trigger phrases from naive matchers with fullwidth letters, Cyrillic or Greek
lookalikes, zero-width joiners, Unicode tag characters, leetspeak (``1gn0r3``), spaced-out letters
(``i g n o r e``) and encodings (base64, hex, rot13, %-escapes). :func:`fold` undoes the
character-level tricks; ``plugins.guard.decode`` finds the encoded payloads, which the scanner
folds and matches too. Both only feed the matchers: the text forwarded upstream is never changed
here.
"""

# ruff: noqa: RUF001
from __future__ import annotations

import functools
import re
import unicodedata

from plugins.guard.hidden import TAG_RUN as _TAG_RUN
from plugins.guard.hidden import VS_RUN as _VS_RUN
from plugins.guard.hidden import untag as _untag
from plugins.guard.hidden import unvs as _unvs
from plugins.guard.shapes import SHAPE, classes

# Zero-width and invisible format characters, bidi controls, and the Unicode tag block (used to
# smuggle invisible ASCII, "ASCII smuggling").
_INVISIBLE = re.compile(
    "[\u00ad\u034f\u061c\u17b4\u17b5\u180b-\u180f\u200b-\u200f\u202a-\u202e"
    "\u2060-\u206f\ufe00-\ufe0f\ufeff\U000e0000-\U000e007f\U000e0100-\U000e01ef]"
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
    # Blank-looking letters (Hangul fillers, the braille blank) between words: spaces, as a
    # reader sees them (deleted, they glued the words into one no rule matches).
    "\u115f": " ", "\u1160": " ", "\u3164": " ", "\uffa0": " ", "\u2800": " ",
    # Small capitals that NFKC leaves alone.
    "ɢ": "g", "ʜ": "h", "ᴅ": "d", "ᴄ": "c", "ʟ": "l", "ᴍ": "m", "ᴘ": "p", "ᴠ": "v", "ᴡ": "w",
    "ᴋ": "k", "ʙ": "b", "ꜰ": "f", "ᴊ": "j", "ᴢ": "z", "ǫ": "q",
    # Typographic punctuation folded to ASCII so patterns can use plain quotes and dashes.
    "‘": "'", "’": "'", "‚": "'", "“": '"', "”": '"', "„": '"', "–": "-", "—": "-", "−": "-",
}  # fmt: skip
_CONFUSABLE_TABLE = str.maketrans(_CONFUSABLES)
#: The lookalike letters alone (no spaces or punctuation), keeping case where the letter has
#: one (Cyrillic capital Es to "C"): for the output guard, whose key patterns are case-sensitive.
LOOKALIKES = str.maketrans(
    {k: (v.upper() if k.isupper() else v) for k, v in _CONFUSABLES.items() if v.isalnum()}
)

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
_MARKS = re.compile(r"[.\-_*]")


def _join_spaced(run: str) -> str:
    """A run of spaced-out letters as words: its separators dropped, except that where letters
    are separated by marks and words by spaces ("r-e-v-e-a-l y-o-u-r") the spaces stay."""
    if " " in run and _MARKS.search(run) is not None:
        return " ".join(_SEPARATORS.sub("", w) for w in run.split(" ") if w)
    return _SEPARATORS.sub("", run)


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


#: Combining diacritical marks (U+0300-U+036F): "îgnöré" reads as "ignore" to a person (and
#: to a model), not to a pattern. Other combining marks (Japanese dakuten, Indic vowel signs)
#: change the letter, and stay.
_DIACRITICS = re.compile("[\u0300-\u036f]")


def _strip_marks(s: str) -> str:
    """``s`` without Latin, Greek and Cyrillic diacritics (recomposed, so the rest is as it
    was)."""
    d = unicodedata.normalize("NFD", s)
    if _DIACRITICS.search(d) is None:
        return s
    return unicodedata.normalize("NFC", _DIACRITICS.sub("", d))


def light_reference(text: str) -> str:
    """:func:`light` step by step, as specified (slow; the tests check :func:`light` against it)."""
    if text.isascii():
        s = text.lower()
    else:
        s = _strip_marks(unicodedata.normalize("NFKC", text))
        s = _INVISIBLE.sub("", _VS_RUN.sub(_unvs, _TAG_RUN.sub(_untag, s)))
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


def collapse(s: str) -> str:
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
    s = _strip_marks(unicodedata.normalize("NFKC", s))
    astral = _ASTRAL.search(s) is not None
    if astral:
        s = _TAG_RUN.sub(_untag, s)  # before the table drops what separates two runs
    if _VS_RUN.search(s) is not None:
        s = _VS_RUN.sub(_unvs, s)  # (hidden bytes: before the table drops the selectors)
    table, changes = _fold_table()
    first = changes.search(s)
    if first is not None:
        # Translate only the span holding changed characters (often one pasted passage of a
        # long prompt): translate works character by character, so this is the same.
        end = len(s) - changes.search(s[::-1]).start()  # type: ignore[union-attr]
        s = s[: first.start()] + s[first.start() : end].translate(table) + s[end:]
    if astral:
        s = _INVISIBLE.sub("", s)  # the other tag characters are outside the table's plane
    return s.casefold()


def light(text: str) -> str:
    """NFKC, invisible characters removed, lookalikes and case folded, whitespace collapsed."""
    if text.isascii():
        # Fast path: ASCII needs none of the Unicode steps. Printable ASCII holds no whitespace
        # but " ", so without two spaces in a row there is nothing to collapse either.
        low = text.lower()
        if "  " not in low and low.isprintable():
            return low
        return collapse(low)
    # Most prompts are ASCII with a few curly quotes, dashes or emoji: only those stretches go
    # through the Unicode steps; the ASCII between them is only lower-cased.
    out: list[str] = []
    last = 0
    for i, m in enumerate(_NON_ASCII.finditer(text)):
        if i == _MAX_STRETCHES:
            return collapse(_fold_unicode(text))
        start = max(m.start() - 1, last)
        out.append(text[last:start].lower())
        out.append(_fold_unicode(text[start : m.end()]))
        last = m.end()
    out.append(text[last:].lower())
    return collapse("".join(out))


def fold_pattern(pattern: str) -> str:
    """A rule's regular expression in the form the text it matches takes: each non-ASCII
    character as :func:`light` folds it (lookalikes, case), the ASCII (all of the regex syntax)
    unchanged. A rule written in Russian, whose letters the lookalike folding turns partly
    Latin ("игнорируй" becomes "иrhopиpyй"), then matches the folded text."""
    if pattern.isascii():
        return pattern
    return "".join(c if c.isascii() else light(c) for c in pattern)


def _spaced(s: str, joins: list[tuple[int, int, int, int]] | None) -> str:
    """``_SPACED.sub(<separators removed>, s)``, tried only where :data:`_SPACED_HINT` matches
    (every match holds one, starting at its second character). ``joins`` (when given) receives
    each joined word's extent in ``s`` and in the result: ``(start, end, new_start, new_end)``."""
    # _SPACED_HINT.search(s, pos).start() is shape.find(" a a ", pos): it has no look-around,
    # and each of its classes is ASCII (the regex, starting with a class, was tried at every
    # space of the text).
    shape = classes(s, SHAPE)
    h = shape.find(" a a ")
    if h == -1:
        return s
    out: list[str] = []
    last = size = 0
    while h != -1:
        m = _SPACED.match(s, h - 1) if h > 0 else None
        if m is None:
            h = shape.find(" a a ", h + 1)
            continue
        out.append(s[last : m.start()])
        size += m.start() - last
        word = _join_spaced(m.group(0))
        out.append(word)
        if joins is not None:
            joins.append((m.start(), m.end(), size, size + len(word)))
        size += len(word)
        last = m.end()
        h = shape.find(" a a ", last)
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
    return _SPACED.sub(lambda m: _join_spaced(m.group(0)), s)


def fold(text: str) -> str:
    """The full matching form: :func:`light` then :func:`deobfuscate`."""
    return deobfuscate(light(text))


def variants(text: str) -> list[str]:
    """The forms rules are matched against: the light form, and the deobfuscated one when it
    differs (leetspeak folding would break literal patterns such as ``<|im_start|>``)."""
    lit = light(text)
    full = deobfuscate(lit)
    return [lit] if full == lit else [lit, full]
