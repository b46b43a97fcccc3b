"""Markup and escapes decoded, so the matchers read a text as a reader (or a model) does.

Tool results are HTML pages, JSON documents and e-mails, and an instruction written in their
syntax reads as plain words to a model while a pattern sees something else: HTML character
references (``&#x69;gnore``, ``&iacute;gnore``), JSON and JavaScript escapes
(``\\u0069gnore``, ``\\x69``), quoted-printable (``=69gnore``, ``=`` soft line breaks), and
tags or comments inside words (``ig<b></b>nore``, ``ig<!-- -->nore``). :func:`unmask` gives
the text with all of them decoded, for the scanner to match too; nothing here changes the
text forwarded upstream.

Each decoder runs only where its marker occurs, and each is one pass of a bounded pattern (no
nested repetition) or a ``str.find`` loop, so the work stays linear in the text's length.
"""

from __future__ import annotations

import binascii
import html
import re

#: An HTML character reference: numeric, or a name (``html.unescape`` also reads the legacy
#: names written without ";", as browsers do).
_ENTITY = re.compile(r"&(?:#[0-9xX]|[A-Za-z][A-Za-z0-9]{1,31};?)")
#: A JSON / JavaScript / Python escape: ``\uXXXX``, ``\u{X...}``, ``\xXX`` and the one-letter
#: ones (an escaped backslash is one escape, so ``\\u0069`` reads "\u0069" as JSON does).
_ESCAPE = re.compile(
    r"\\(?:u([0-9a-fA-F]{4})|u\{([0-9a-fA-F]{1,6})\}|x([0-9a-fA-F]{2})|([nrtbf\"'/\\]))"
)
_ESCAPE_HINT = re.compile(r"\\(?:u[0-9a-fA-F{]|x[0-9a-fA-F]|[nrt])")
_ONE_LETTER = {"n": "\n", "r": "\r", "t": "\t", "b": "\b", "f": "\f"}
_SURROGATE = re.compile("[\ud800-\udfff]")
#: Quoted-printable: an escaped byte, or a soft line break.
_QP = re.compile(r"=(?:[0-9A-Fa-f]{2}|\r?\n)")
#: An HTML start, end or empty tag (name, then attributes up to 256 characters, no "<" or ">"
#: in them).
_TAG = re.compile(r"<(/?)([A-Za-z][A-Za-z0-9]{0,15})(?:[\s/][^<>]{0,256})?>")
#: Elements a browser lays out as their own line or cell: the words on either side of one of
#: these tags are apart. Every other tag (``b``, ``span``, ``a``, unknown names) joins them:
#: ``ig<b></b>nore`` reads "ignore".
_BLOCK = frozenset(
    "address article aside blockquote br dd details dialog div dl dt fieldset figcaption "
    "figure footer form h1 h2 h3 h4 h5 h6 header hr li main nav ol p pre section summary "
    "table tbody td tfoot th thead title tr ul body head html option caption".split()
)
#: Any of the markers above (a tag's whole extent; a comment's opening, extended to its end).
_MARKER = re.compile(
    r"&(?:#[0-9xX]|[A-Za-z][A-Za-z0-9]{1,31};?)|\\(?:u[0-9a-fA-F{]|x[0-9a-fA-F]|[nrt])"
    r"|=(?:[0-9A-Fa-f]{2}|\r?\n)|<!--|</?[A-Za-z][A-Za-z0-9]{0,15}(?:[\s/][^<>]{0,256})?>"
)
#: Characters of context decoded on each side of a marker (a rule match that starts this far
#: before one is still seen: the deobfuscated form's reach, ``rules.WINDOW_REACH``).
CONTEXT = 160
#: Beyond this many markers in a text (an HTML page), the whole text is decoded at once.
MAX_MARKERS = 64
#: Rounds of decoding: a second one reads what the first produced (``&amp;#x69;``,
#: ``&lt;b&gt;`` inside a word, an escaped entity).
ROUNDS = 2


def _escape(m: re.Match[str]) -> str:
    hex4, braced, hex2, letter = m.groups()
    if letter is not None:
        return _ONE_LETTER.get(letter, letter)
    code = int(hex4 or braced or hex2, 16)
    return chr(code) if code <= 0x10FFFF else "\ufffd"


def _unescape(text: str) -> str:
    s = _ESCAPE.sub(_escape, text)
    if _SURROGATE.search(s) is not None:
        # A pair of \uXXXX escapes spelling one astral character (an emoji, a tag character).
        s = s.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    return s


def _quoted_printable(text: str) -> str:
    raw = binascii.a2b_qp(text.encode("utf-8", "surrogatepass"))
    return raw.decode("utf-8", "replace")


def _tag(m: re.Match[str]) -> str:
    # A line break, not a space: "</li><li>" as two spaces would send every page through the
    # scanner's spelt-out-words pass, which looks for words two spaces apart.
    return "\n" if m.group(2).lower() in _BLOCK else ""


def _uncomment(text: str) -> str:
    """``text`` without its ``<!-- ... -->`` comments (which a reader does not see)."""
    out: list[str] = []
    last = 0
    i = text.find("<!--")
    while i != -1:
        j = text.find("-->", i + 4)
        if j == -1:
            break  # no comment closes after this one
        out.append(text[last:i])
        last = j + 3
        i = text.find("<!--", last)
    if not out:
        return text
    out.append(text[last:])
    return "".join(out)


def _decode_once(text: str) -> str:
    if "=" in text and _QP.search(text) is not None:
        text = _quoted_printable(text)
    if "\\" in text and _ESCAPE_HINT.search(text) is not None:
        text = _unescape(text)
    if "<" in text:
        if "<!--" in text:
            text = _uncomment(text)
        text = _TAG.sub(_tag, text)
    if "&" in text and _ENTITY.search(text) is not None:
        text = html.unescape(text)
    return text


def has_markup(text: str) -> bool:
    """Whether :func:`unmask` may change ``text`` (substring tests first: most prompts have
    none of the markers)."""
    return (
        ("&" in text and _ENTITY.search(text) is not None)
        or ("\\" in text and _ESCAPE_HINT.search(text) is not None)
        or ("=" in text and _QP.search(text) is not None)
        or ("<" in text and ("<!--" in text or _TAG.search(text) is not None))
    )


def unmask(text: str) -> str | None:
    """``text`` with its quoted-printable, escapes, HTML comments and tags and character
    references decoded (twice over, for markup inside markup); None when it has none."""
    if not has_markup(text):
        return None
    out = text
    for _ in range(ROUNDS):
        nxt = _decode_once(out)
        if nxt == out:
            break
        out = nxt
    return out if out != text else None


def _edge_after(text: str, lo: int, limit: int) -> int:
    """``lo`` moved forward past the next whitespace before ``limit`` (a segment does not
    start inside a word, where a cut would make a word boundary the text does not have)."""
    for i in range(lo, limit):
        if text[i].isspace():
            return i + 1
    return lo


def _edge_before(text: str, hi: int, limit: int) -> int:
    """``hi`` moved back to the last whitespace after ``limit`` (see :func:`_edge_after`)."""
    for i in range(hi - 1, limit - 1, -1):
        if text[i].isspace():
            return i
    return hi


def unmasked_segments(text: str) -> list[str]:
    """The parts of ``text`` that markup or escapes change, decoded (:func:`unmask`): each
    cluster of markers with :data:`CONTEXT` characters around it, cut at whitespace; the
    whole text when it has more than :data:`MAX_MARKERS` of them. Empty when it has none."""
    if not has_markup(text):
        return []
    n = len(text)
    spans: list[tuple[int, int]] = []
    for count, m in enumerate(_MARKER.finditer(text)):
        if count == MAX_MARKERS:
            whole = unmask(text)
            return [] if whole is None else [whole]
        start, end = m.span()
        if m.group(0) == "<!--":
            close = text.find("-->", end)
            if close == -1:
                continue
            end = close + 3
        lo, hi = max(0, start - CONTEXT), min(n, end + CONTEXT)
        if spans and lo <= spans[-1][1]:
            spans[-1] = (spans[-1][0], max(spans[-1][1], hi))
        else:
            spans.append((lo, hi))
    out = []
    for lo, hi in spans:
        lo = _edge_after(text, lo, min(hi, lo + CONTEXT)) if lo else 0
        hi = _edge_before(text, hi, max(lo, hi - CONTEXT)) if hi < n else n
        decoded = unmask(text[lo:hi])
        if decoded is not None:
            out.append(decoded)
    return out
