"""The output guard: secrets and a system-prompt canary in the model's answer, streamed or not.

Streams are scanned as text accumulates, per choice. Any unfinished token (a key arrives in
pieces with no space in it), a trailing run of digits (a card number split at a space), an
unterminated private-key block and the last ``window_chars`` characters (by default only as many
as the canary and the types whose matches hold spaces need: none for the default types) are
held back; everything before is scanned, redacted if needed, and released. So a secret split
across any number of chunks is still seen whole. Held text is released at ``finish_reason`` or
at the end of the stream.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Iterable
from typing import Literal

from pydantic import Field, model_validator

from gateway.configbase import Strict
from gateway.redact import SECRET_TYPES, SecretHit, find_secrets, placeholder
from plugins.guard.bidi import strip_bidi
from plugins.guard.jsontext import json_cut, plain_escapes
from plugins.guard.normalize import LOOKALIKES as _LOOKALIKES
from plugins.guard.scanner import Finding

_NUMERIC_TAIL = re.compile(r"[\d+(][\d \-()]*$")
_KEY_BEGIN = "-----BEGIN"
#: Characters after which the held-back text may be cut besides " " and "\n": other white
#: space, and letters of scripts without spaces between words that no secret pattern holds and
#: the lookalike folding leaves alone (CJK punctuation, kana, ideographs, Hangul, Thai letters;
#: not Thai digits, which ``\d`` matches, nor fullwidth forms, which fold to ASCII).
_BREAK = re.compile("[\\s\u0e01-\u0e4f\u3001-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af]")
_KEY_END = re.compile(r"-----END (?:[A-Z0-9]+ )*PRIVATE KEY-----")
#: What :data:`_NUMERIC_TAIL` matches besides digits (``\d``: ``str.isdecimal``).
_TAIL_CHARS = frozenset("+( -)")


def _may_end_number(text: str, end: int) -> bool:
    """False where ``_NUMERIC_TAIL.search(text, 0, end)`` finds nothing, read from the last
    two characters (after a word and a space, the usual cut, it cannot match: a regex search
    tries every position of the text). A match ends at ``end``, or before a line break there
    (``$``); its last character is one of the pattern's, and a space, "-" or ")" cannot begin
    it, so another of them comes before."""
    if end and text[end - 1] == "\n":
        end -= 1
    if not end:
        return False
    last = text[end - 1]
    if not (last in _TAIL_CHARS or last.isdecimal()):
        return False
    if last in "+(" or last.isdecimal():
        return True
    before = text[end - 2] if end > 1 else ""
    return bool(before) and (before in _TAIL_CHARS or before.isdecimal())


class OutputConfig(Strict):
    enabled: bool = True
    #: What a secret in the answer does: redact it, end the answer (block), or only flag it.
    secrets: Literal["block", "redact", "flag"] = "redact"
    #: Secret types looked for in answers (e-mail and phone are common in honest answers).
    secret_types: tuple[str, ...] = ("api_key", "private_key", "jwt", "credit_card")
    #: A string planted in your system prompt; seeing it in an answer means the prompt leaked.
    canary: str = Field("", repr=False)
    canary_action: Literal["block", "redact", "flag"] = "block"
    #: Characters held back while streaming, besides the unfinished token, a trailing number
    #: and an open key block, so that a match with spaces in it split across chunks is still
    #: caught. Unset: as few as the types and the canary need (the canary's length; 42 with
    #: ``iban``, 36 with ``phone``; none for the default types, whose matches have no spaces).
    window_chars: int | None = Field(None, ge=8, le=4096)
    #: An unbroken token or key block longer than this is released (scanned) anyway.
    max_hold_chars: int = Field(8192, ge=256)

    @model_validator(mode="after")
    def _check(self) -> OutputConfig:
        unknown = [t for t in self.secret_types if t not in SECRET_TYPES]
        if unknown:
            raise ValueError(
                f"output.secret_types: unknown type {unknown[0]!r}; "
                f"allowed: {', '.join(SECRET_TYPES)}"
            )
        span = canary_pattern(self.canary)[1]
        if self.window_chars is not None and span > self.window_chars:
            raise ValueError(
                f"output.window_chars must be at least {span}: the longest way the canary can "
                "be written (its letters and digits with up to "
                f"{CANARY_GAP} other characters between each two)"
            )
        return self

    def hold_window(self) -> int:
        """``window_chars``, or when unset the least the configured matches need."""
        if self.window_chars is not None:
            return self.window_chars
        return max(
            [canary_pattern(self.canary)[1]] + [SPACED_SPAN.get(t, 0) for t in self.secret_types]
        )


#: Characters other than letters and digits allowed between two of the canary's own: a model
#: told to write the system prompt "with dashes between the letters" or spaced out still leaks
#: it ("C-A-N-A-R-Y", "c a n a r y", "C, A, N"). Where the canary itself has a longer run of
#: them, that run's length applies.
CANARY_GAP = 2


@functools.lru_cache(maxsize=16)
def canary_pattern(canary: str) -> tuple[re.Pattern[str] | None, int]:
    """The canary as a case-insensitive pattern tolerating :data:`CANARY_GAP` separators
    between its letters and digits, and the length of its longest match (0: no canary).
    Cached: the config's checks and the guard ask for the same canary."""
    if not canary:
        return None, 0
    chars: list[tuple[str, int]] = []  # each letter or digit, and the separators before it
    run = 0
    for ch in canary:
        if ch.isalnum():
            chars.append((ch, run))
            run = 0
        else:
            run += 1
    if not chars:  # no letter or digit: the string itself
        return re.compile(re.escape(canary), re.IGNORECASE), len(canary)
    parts, span = [re.escape(chars[0][0])], 1
    for ch, own in chars[1:]:
        gap = max(CANARY_GAP, own)
        parts.append(rf"[\W_]{{0,{gap}}}{re.escape(ch)}")
        span += gap + 1
    return re.compile("".join(parts), re.IGNORECASE), span


#: Types whose matches may hold spaces that the other hold-back rules do not cover (letters
#: between IBAN groups, dots between phone digits), and their longest match: an IBAN is at most
#: 34 characters in groups of four (8 spaces); the phone pattern's longest form is 36.
SPACED_SPAN = {"iban": 42, "phone": 36}


#: Characters that hide a secret or the canary from a matcher while a reader does not see them:
#: zero-width and format characters, joiners, the soft hyphen, bidi controls, variation
#: selectors, tag characters.
_DROP = re.compile(
    "[\u00ad\u034f\u061c\u180e\u200b-\u200f\u202a-\u202e\u2060-\u2069\ufe00-\ufe0f"
    "\ufeff\U000e0000-\U000e007f\U000e0100-\U000e01ef]"
)


@functools.lru_cache(maxsize=8192)
def _seen_as(c: str) -> str:
    """What a reader takes the non-ASCII character ``c`` for: nothing (invisible), or its NFKC
    form with Latin lookalikes folded (fullwidth, mathematical, circled or Cyrillic "C": "C");
    itself otherwise."""
    if _DROP.match(c):
        return ""
    seen = unicodedata.normalize("NFKC", c)
    folded = seen.translate(_LOOKALIKES)
    return folded if folded.isascii() else seen


def _visible(text: str) -> tuple[str, list[int]] | None:
    """``text`` as a reader sees it (hiding characters dropped, fullwidth, mathematical,
    circled and Cyrillic lookalikes as ASCII), and the index in ``text`` of each of its
    characters; None when nothing changes (ASCII text, the usual, costs one test)."""
    if text.isascii():
        return None
    out: list[str] = []
    index: list[int] = []
    changed = False
    for i, c in enumerate(text):
        seen = c if c.isascii() else _seen_as(c)
        if seen != c:
            changed = True
        for ch in seen:
            out.append(ch)
            index.append(i)
    return ("".join(out), index) if changed else None


def hides_characters(text: str) -> bool:
    """Whether ``text`` holds a character a reader does not see (one regex sweep)."""
    return not text.isascii() and _DROP.search(text) is not None


def seen_text(text: str) -> str:
    """``text`` as a reader (or a model decoding JSON) takes it: escapes of printable ASCII
    decoded, invisible characters dropped, lookalikes folded."""
    plain = plain_escapes(text)
    vis = _visible(plain)
    return vis[0] if vis is not None else plain


def _raw(index: list[int] | None, start: int, end: int) -> tuple[int, int]:
    """A span of the visible text as the span of the text it was read from."""
    if index is None:
        return start, end
    if start >= len(index):
        return index[-1] + 1, index[-1] + 1
    return index[start], index[end - 1] + 1 if end > start else index[start]


def _merged(hits: list[SecretHit], more: list[SecretHit]) -> list[SecretHit]:
    """Two lists of hits as one, in order, without overlaps (the earlier start wins)."""
    out: list[SecretHit] = []
    for h in sorted(hits + more, key=lambda h: (h.start, -h.end)):
        if not out or h.start >= out[-1].end:
            out.append(h)
    return out


class OutputGuard:
    def __init__(self, cfg: OutputConfig) -> None:
        self.cfg = cfg
        self.types = frozenset(cfg.secret_types)
        self._canary, _ = canary_pattern(cfg.canary)
        self.window = cfg.hold_window()
        #: Whether :data:`_BREAK`'s letters may end a held word (not when the canary has
        #: letters of those scripts itself).
        self._breaks = _BREAK.search(cfg.canary or "") is None
        #: The deployments' own credentials (``set_credentials``), as one pattern.
        self._credentials: re.Pattern[str] | None = None

    def set_credentials(self, secrets: Iterable[str]) -> None:
        """Also find these strings (the deployments' keys) in answers, whatever their shape:
        an upstream that quotes the credentials it was sent must not hand them to clients,
        also when it spells them over several stream events (one event is scrubbed by the
        relay). A string holding another one is covered by it ("Bearer <key>")."""
        found = sorted({s for s in secrets if len(s) >= 8}, key=len)
        kept = [s for i, s in enumerate(found) if not any(t in s for t in found[:i])]
        self._credentials = re.compile("|".join(re.escape(s) for s in kept)) if kept else None

    # --- one complete text (non-streamed answers, or a released span) ---------------------------

    def _canary_pass(self, text: str, cut: int, findings: list[Finding]) -> tuple[str, int]:
        """Canaries ending before ``cut`` become findings; one straddling it moves ``cut``."""
        if self._canary is None:
            return text, cut
        spans = []
        vis = _visible(text)
        index = None if vis is None else vis[1]
        for m in self._canary.finditer(text if vis is None else vis[0]):
            start, end = _raw(index, *m.span())
            if end > cut:
                # Not redacted in this pass: hold back as if the text ended where it starts,
                # since a key or IBAN just before it is only one once the canary is gone (its
                # end needs a non-alphanumeric character after it).
                cut = min(cut, self._safe_cut(text, start))
                break
            spans.append((start, end))
        if not spans:
            return text, cut
        findings.append(Finding("output", "system_prompt_leak", self.cfg.canary_action, "canary"))
        if self.cfg.canary_action != "redact":
            return text, cut
        mark = placeholder("canary")
        for start, end in reversed(spans):
            text = text[:start] + mark + text[end:]
        return text, cut + sum(len(mark) - (end - start) for start, end in spans)

    def check(self, text: str, json_text: bool = False) -> tuple[str, list[Finding]]:
        """The text with redactions applied (when the actions say so), and the findings.
        ``json_text``: the text is JSON (call arguments), read with its escapes decoded."""
        findings: list[Finding] = []
        if json_text:
            plain = plain_escapes(text)
            if plain != text:
                checked, findings = self.check(plain)
                return (checked if findings or checked != plain else text), findings
        if not text.isascii():  # (ASCII text, the usual, has none: no call)
            # Bidi controls go: the client then displays the order read here (plugins.guard.bidi).
            text = strip_bidi(text)
        cut = len(text)
        if self._canary is not None:
            text, cut = self._canary_pass(text, cut, findings)
        return self._redact(text, cut, findings)[0], findings

    def _redact(self, text: str, cut: int, findings: list[Finding]) -> tuple[str, int]:
        """Handle secrets ending before ``cut``; a secret straddling it moves ``cut`` back."""
        vis = None if text.isascii() else _visible(text)  # (ASCII text: no call)
        index = None if vis is None else vis[1]
        seen = text if vis is None else vis[0]
        hits = find_secrets(seen, self.types)
        if self._credentials is not None:
            own = [SecretHit("credential", *m.span()) for m in self._credentials.finditer(seen)]
            if own:
                hits = _merged(hits, own)
        out: list[str] = []
        pos = 0
        for h in hits:
            start, end = _raw(index, h.start, h.end)
            if start >= cut:
                break
            if end > cut:
                cut = start
                break
            findings.append(Finding("output", h.type, self.cfg.secrets, h.type))
            if self.cfg.secrets == "redact":
                out.append(text[pos:start])
                out.append(placeholder(h.type))
                pos = end
        if pos == 0:
            return text, cut
        # Redaction shifts offsets: recompute ``cut`` in the rewritten text.
        tail = text[pos:]
        head = "".join(out)
        return head + tail, len(head) + (cut - pos)

    # --- streaming -----------------------------------------------------------------------

    def _safe_cut(self, text: str, end: int | None = None) -> int:
        """How much of ``text[:end]`` (all of it by default) may be released: everything a
        match that continues past ``end`` cannot reach back into."""
        n = len(text) if end is None else end
        cut = n - self.window
        if cut <= 0:
            return 0
        if not text[cut - 1].isspace() and (cut == n or not text[cut].isspace()):
            # (The last " ", "\n" or "\t": the rarer two are looked for only when present.)
            ws = text.rfind(" ", 0, cut)
            if "\n" in text:
                ws = max(ws, text.rfind("\n", 0, cut))
            if "\t" in text:
                ws = max(ws, text.rfind("\t", 0, cut))
            if self._breaks and not text.isascii():
                # Scripts written without spaces (Chinese, Japanese, Thai) and other white
                # space: a cut after one of their characters splits no secret or canary, so
                # such an answer streams as it comes, not all at once at its end.
                for brk in _BREAK.finditer(text, ws + 1, cut):
                    ws = brk.start()
            if ws >= 0:
                cut = ws + 1
            elif n < self.cfg.max_hold_chars:
                return 0
        m = _NUMERIC_TAIL.search(text, 0, cut) if _may_end_number(text, cut) else None
        if m:
            cut = m.start()
        begin = text.rfind(_KEY_BEGIN, 0, cut) if _KEY_BEGIN in text else -1
        if begin >= 0 and not _KEY_END.search(text, begin, n) and n < self.cfg.max_hold_chars:
            cut = begin
        return cut

    def feed(
        self, held: str, text: str, final: bool, json_text: bool = False
    ) -> tuple[str, str, list[Finding]]:
        """Add ``text`` to the ``held`` text of one choice: (released, still held, findings).
        ``json_text`` (call arguments): escapes of printable ASCII are decoded first, and
        released so (the same JSON); an escape cut by the end of ``text`` is decoded once it is
        whole (it is part of the last word, which is always held)."""
        pending = held + text
        if json_text:
            pending = plain_escapes(pending)
        pending = strip_bidi(pending)
        if not final and len(pending) <= self.window:
            return "", pending, []  # all of it is still held: nothing to scan yet
        findings: list[Finding] = []
        cut = len(pending) if final else self._safe_cut(pending)
        if json_text and not final:
            cut = json_cut(pending, cut)
        if cut == 0:
            return "", pending, findings
        if self._canary is not None:
            pending, cut = self._canary_pass(pending, cut, findings)
        pending, cut = self._redact(pending, cut, findings)
        return pending[:cut], pending[cut:], findings
