"""Secrets and PII detection: API keys, private keys, JWTs, cards (Luhn), e-mail, IBAN, phone.

Core, because two parts need it: the guard plugin (block, redact or flag secrets in prompts and
answers) and the request log (``logging.include_text`` redacts before writing).

Detection works on the raw text (not the folded form), so redaction can rewrite exactly the
matched span. Findings carry the type and the span, never the secret in a log or error. The
prefilters that let most texts skip most patterns are in :mod:`gateway.secret_hints`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from gateway.secret_hints import IBAN_HINT, card_and_iban_hints, may_contain, may_hold_secret

#: Every type the detector knows; the guard's config gives each an action.
SECRET_TYPES = (
    "api_key",
    "private_key",
    "jwt",
    "credit_card",
    "email",
    "iban",
    "phone",
)

#: Keys found wherever they start (prefixes no word contains, and random-looking bare "sk-"
#: keys), so a letter or digit glued in front ("Xsk-proj-...", which a model can be told to
#: write) or behind does not hide them.
_API_KEY_ANYWHERE = (
    r"sk-ant-(?:api|admin)\d{2}-[A-Za-z0-9_\-]{20,}"  # Anthropic
    r"|sk-(?:proj|svcacct|admin)-[A-Za-z0-9_\-]{20,}"  # OpenAI
    r"|(?:AKIA|ASIA)[0-9A-Z]{16}"  # AWS access key id
    r"|gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{40,}"  # GitHub
    r"|xox[abposr]-[A-Za-z0-9\-]{10,}"  # Slack
    r"|AIza[0-9A-Za-z_\-]{35}"  # Google
    r"|sk_live_[0-9a-zA-Z]{24,}|rk_live_[0-9a-zA-Z]{24,}"  # Stripe
    # A bare "sk-" key (OpenAI's older keys, many OpenAI-compatible providers): 32+ letters
    # and digits of both cases with a digit, as random keys have; a slug or a hex id glued to
    # a word ("risk-assessment-...", "task-3f2a...") has hyphens or one case.
    r"|sk-(?=[A-Za-z0-9]{0,31}[A-Z])(?=[A-Za-z0-9]{0,31}[a-z])(?=[A-Za-z0-9]{0,31}[0-9])"
    r"[A-Za-z0-9]{32,}"
)
#: Any other "sk-" token: only as a word of its own (inside a word it is a slug). The check of
#: the character before comes after the literal, so that every branch of the pattern starts with
#: a literal and the engine skips ahead to their first letters (a look-behind first made the
#: whole pattern ~2.3x slower).
_API_KEY_WORD = r"sk-(?<![A-Za-z0-9]sk-)[A-Za-z0-9_\-]{20,}"
_PATTERNS: dict[str, str] = {
    # A header alone is enough: an unterminated key block is redacted to the end of the text.
    "private_key": (
        r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----"
        r"(?:[\s\S]*?-----END (?:[A-Z0-9]+ )*PRIVATE KEY-----|[\s\S]*\Z)"
    ),
    # No word boundary before it: in JSON text (tool-call arguments) an escaped line break
    # leaves an "n" glued to the token ("\\neyJ..."); two "eyJ" parts and the dots are
    # distinctive enough on their own.
    "jwt": r"eyJ[A-Za-z0-9_\-]{8,}\.eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}",
    "api_key": rf"{_API_KEY_ANYWHERE}|{_API_KEY_WORD}",
    "email": (
        r"(?<![\w.+\-])[A-Za-z0-9._%+\-]{1,64}@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*"
        r"\.[A-Za-z]{2,24}\b"
    ),
    # Starts with \d (then checks the character before it), so the engine skips to digits
    # instead of trying a look-behind at every position: same matches, ~5x faster.
    "credit_card": r"\d(?<![\d\-]\d)(?:[ \-]?\d){12,18}(?![\d\-])",
    "iban": r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?\b",
    "phone": (
        r"(?<![\w+])\+\d{1,3}[ \-.]?(?:\(\d{1,4}\)[ \-.]?)?\d{2,4}(?:[ \-.]?\d{2,4}){2,4}"
        r"(?!\d)"
    ),
}
_COMPILED = {name: re.compile(p) for name, p in _PATTERNS.items()}
# What the e-mail pattern's look-behind rejects, and its local-part characters.
_EMAIL_LOCAL = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._%+-")


def _email_start(text: str, at: int, lo: int) -> int | None:
    """Where the e-mail pattern's leftmost match using the "@" at ``at`` would start (searching
    from ``lo``): the first position of the local-part run before it (at most 64 characters)
    that its look-behind ``(?<![\\w.+\\-])`` accepts."""
    j = at
    lo = max(lo, at - 64)
    while j > lo and text[j - 1] in _EMAIL_LOCAL:
        j -= 1
    for s in range(j, at):
        if s == 0:
            return s
        prev = text[s - 1]
        if not (prev.isalnum() or prev in "_.+-"):
            return s
    return None


def _emails(text: str) -> list[re.Match[str]]:
    """``_COMPILED["email"].finditer(text)``, tried only around each "@".

    Every match is a local part, "@" and a domain; the part after "@" does not depend on where
    the match starts, so one attempt per "@", at the leftmost start the regex would try, gives
    the same matches as sweeping every position (the slowest step on long texts)."""
    rx = _COMPILED["email"]
    out: list[re.Match[str]] = []
    pos = 0
    at = text.find("@")
    while at != -1:
        start = _email_start(text, at, pos)
        m = rx.match(text, start) if start is not None else None
        if m is not None:
            out.append(m)
            pos = m.end()
            at = text.find("@", pos)
        else:
            at = text.find("@", at + 1)
    return out


def _ibans(text: str) -> list[re.Match[str]]:
    """``_COMPILED["iban"].finditer(text)``, tried only where :data:`IBAN_HINT` matches.

    The pattern starts with ``\\b``, so the engine tried it at every character (~0.1 ms on
    2,000 tokens). Every match starts two letters before a hint's digits, so the leftmost
    match from a position is the first hint after it, less two, where the pattern matches."""
    rx = _COMPILED["iban"]
    out: list[re.Match[str]] = []
    pos = 0
    h = IBAN_HINT.search(text, 2)
    while h is not None:
        m = rx.match(text, h.start() - 2)
        if m is not None:
            out.append(m)
            pos = m.end()
            h = IBAN_HINT.search(text, max(pos + 2, h.start() + 1))
        else:
            h = IBAN_HINT.search(text, h.start() + 1)
    return out


@dataclass(frozen=True, slots=True)
class SecretHit:
    type: str
    start: int
    end: int


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def _iban_ok(s: str) -> bool:
    s = s.replace(" ", "")
    if not 15 <= len(s) <= 34:
        return False
    moved = s[4:] + s[:4]
    try:
        return int("".join(str(int(c, 36)) for c in moved)) % 97 == 1
    except ValueError:
        return False


def issuer_ok(digits: str) -> bool:
    """Whether a card network issues numbers that start so, at that length (ISO/IEC 7812
    ranges of Visa, Mastercard, Amex, Discover, JCB, Diners, UnionPay, Maestro, Mir). One
    number in ten passes the Luhn check by chance; IMEIs (15 digits from "35"/"86"), chat and
    database ids (from "1") and phone numbers written from "00" pass it by design or often,
    and none is a card."""
    n = len(digits)
    first = digits[0]
    if first == "4":  # Visa
        return n in (13, 16, 19)
    two, four = int(digits[:2]), int(digits[:4])
    if first == "5":  # Mastercard 51-55; Maestro 50, 56-58
        return 12 <= n <= 19 if two in (50, 56, 57, 58) else n == 16 and two <= 55
    if first == "2":  # Mir 2200-2204; Mastercard 2221-2720
        return (2200 <= four <= 2204 and 16 <= n <= 19) or (2221 <= four <= 2720 and n == 16)
    if first == "3":  # Amex 34/37; JCB 3528-3589; Diners 300-305, 36, 38, 39
        if two in (34, 37):
            return n == 15
        if 3528 <= four <= 3589:
            return 16 <= n <= 19
        return (300 <= int(digits[:3]) <= 305 or two in (36, 38, 39)) and 14 <= n <= 19
    if first == "6":  # Discover, UnionPay, Maestro
        return 16 <= n <= 19 or (n >= 12 and two in (60, 63, 67))
    return False


#: What documentation and templates put where a key goes: not a secret, whatever its shape.
_PLACEHOLDER_KEY = re.compile(
    r"your|here|example|placeholder|dummy|redacted|changeme|insert|replace|xxxx|\.\.\.",
    re.IGNORECASE,
)
#: A domain ending like a file name ("logo@2x.png", "icon@3x.webp"): a retina image, not mail.
_FILE_SUFFIX = re.compile(r"\.(?:png|jpe?g|gif|svg|webp|ico|bmp|tiff?|css|js|mjs|ts|json|md)$")


def _valid(kind: str, text: str) -> bool:
    if kind == "credit_card":
        digits = re.sub(r"[ \-]", "", text)
        if not digits.isascii():  # fullwidth or other scripts' digits (the pattern's \d)
            digits = "".join(str(int(c)) for c in digits)
        return (
            13 <= len(digits) <= 19
            and luhn_ok(digits)
            and len(set(digits)) > 1
            and issuer_ok(digits)
        )
    if kind == "api_key":
        return _PLACEHOLDER_KEY.search(text) is None
    if kind == "email":
        return _FILE_SUFFIX.search(text) is None
    if kind == "iban":
        return _iban_ok(text)
    if kind == "phone":
        return 8 <= sum(c.isdigit() for c in text) <= 15
    return True


def _card_within(text: str, start: int, end: int) -> tuple[int, int] | None:
    """The longest card number inside a digit run that is not one (the pattern is greedy:
    "3.14 4933-2029-4382-8554" matches from the "14"), cut at its separators."""
    span = text[start:end]
    cuts = [i for i, c in enumerate(span) if c in " -"]
    if not cuts:
        return None
    best: tuple[int, int] | None = None
    for a in (0, *(c + 1 for c in cuts)):
        for b in (*cuts, len(span)):
            if b - a >= 13 and (best is None or b - a > best[1] - best[0]):
                if _valid("credit_card", span[a:b]):
                    best = (a, b)
    return None if best is None else (start + best[0], start + best[1])


def find_secrets(text: str, types: frozenset[str] | None = None) -> list[SecretHit]:
    """Secrets in ``text``, in order, non-overlapping; only ``types`` when given."""
    if not text or not may_hold_secret(text, types):
        return []
    found: list[SecretHit] = []
    both = types is None or ("credit_card" in types and "iban" in types)
    digits = card_and_iban_hints(text) if both else None
    # Dict order is the priority when spans overlap (a key block contains base64 "numbers").
    for kind, rx in _COMPILED.items():
        if types is not None and kind not in types:
            continue
        if digits is not None and kind in ("credit_card", "iban"):
            if not digits[kind == "iban"]:
                continue
        elif not may_contain(kind, text):
            continue
        matches: Iterable[re.Match[str]]
        if kind == "email":
            matches = _emails(text)
        else:
            matches = _ibans(text) if kind == "iban" else rx.finditer(text)
        for m in matches:
            if kind == "email" and text.startswith(":", m.end()) and m.end() + 1 < len(text):
                if not text[m.end() + 1].isspace():
                    continue  # "git@github.com:org/repo.git": an scp address, not mail
            if _valid(kind, m.group(0)):
                found.append(SecretHit(kind, m.start(), m.end()))
            elif kind == "credit_card":
                within = _card_within(text, m.start(), m.end())
                if within is not None:
                    found.append(SecretHit(kind, *within))
    if len(found) < 2:
        return found
    hits: list[SecretHit] = []
    for h in sorted(found, key=lambda h: (h.start, -h.end)):
        if hits and h.start < hits[-1].end:
            # Overlaps an earlier (or longer) finding: one span covering both, under the
            # earlier one's type, so no part of either is left out of a redaction.
            if h.end > hits[-1].end:
                hits[-1] = SecretHit(hits[-1].type, hits[-1].start, h.end)
            continue
        hits.append(h)
    return hits


def placeholder(kind: str) -> str:
    return f"[REDACTED:{kind}]"


def redact(text: str, hits: list[SecretHit]) -> str:
    """``text`` with each hit replaced by ``[REDACTED:<type>]``."""
    if not hits:
        return text
    out: list[str] = []
    pos = 0
    for h in hits:
        out.append(text[pos : h.start])
        out.append(placeholder(h.type))
        pos = h.end
    out.append(text[pos:])
    return "".join(out)


def url_for_logs(url: str) -> str:
    """``scheme://host[:port]/path`` of ``url`` for logs and messages: no user, password, query
    or fragment. Not a URL parser's ``hostname``: a password holding "/", "?" or "#" (common in
    base64-style secrets) ends the host part for a parser, which then shows the password's
    first part as the host or port, or fails quoting it. Everything up to the last "@" goes."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return "(a URL without a scheme)"
    rest = rest[rest.rfind("@") + 1 :]
    for stop in ("?", "#"):
        rest = rest.split(stop, 1)[0]
    return f"{scheme}://{rest}"
