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


def _leet(m: re.Match[str]) -> str:
    tok = m.group(0)
    # A trailing "!" is punctuation ("hello!"), not a letter.
    core = tok.rstrip("!+")
    if len(core) < 2 or not any(c.isalpha() for c in core):
        return tok
    if not any(c in _LEET_CHARS for c in core):
        return tok
    return core.translate(_LEET_TABLE) + tok[len(core) :]


def light(text: str) -> str:
    """NFKC, invisible characters removed, lookalikes and case folded, whitespace collapsed."""
    if text.isascii():
        # Fast path: ASCII needs none of the Unicode steps.
        s = text.lower()
    else:
        s = unicodedata.normalize("NFKC", text)
        s = _INVISIBLE.sub("", s)
        s = s.translate(_CONFUSABLE_TABLE).casefold()
        # Casefolding can produce further lookalikes (e.g. upper-case Greek).
        s = s.translate(_CONFUSABLE_TABLE)
    return _WHITESPACE.sub(" ", s)


def deobfuscate(lit: str) -> str:
    """Leetspeak and spaced-out letters folded, on the output of :func:`light`."""
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
#: Cap on decoded segments per text, so a crafted prompt cannot make the scan expensive.
MAX_SEGMENTS = 16
#: Texts longer than this are only rot13-decoded when they mention rot13 (cost control).
_ROT13_ALWAYS_BELOW = 4096


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


def _decode_once(text: str, kinds: Iterable[str]) -> list[str]:
    out: list[str] = []
    for kind in kinds:
        if kind == "base64":
            for m in _B64.finditer(text):
                s = _b64(m.group(0))
                if s:
                    out.append(s)
        elif kind == "hex":
            for m in _HEX.finditer(text):
                s = _hex(m.group(0))
                if s:
                    out.append(s)
        elif kind == "url":
            if len(_PCT.findall(text, 0, 4096)) >= 3:
                s = urllib.parse.unquote(text.replace("+", " "))
                if s != text:
                    out.append(s)
        elif kind == "rot13":
            if len(text) < _ROT13_ALWAYS_BELOW or _ROT13_HINT.search(text):
                out.append(codecs.encode(text, "rot13"))
        if len(out) >= MAX_SEGMENTS:
            break
    return out[:MAX_SEGMENTS]


def decoded_variants(text: str, kinds: Iterable[str] = DECODERS, depth: int = 2) -> list[str]:
    """Decoded payloads hidden in ``text`` (base64 of hex, etc. up to ``depth`` levels)."""
    kinds = tuple(kinds)
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
