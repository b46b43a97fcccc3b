"""The output guard: secrets and a system-prompt canary in the model's answer, streamed or not.

Streams are scanned as text accumulates, per choice. The last ``window_chars`` characters, any
unfinished token (a key arrives in pieces with no space in it), a trailing run of digits (a card
number split at a space) and an unterminated private-key block are held back; everything before
is scanned, redacted if needed, and released. So a secret split across any number of chunks is
still seen whole. Held text is released at ``finish_reason`` or at the end of the stream.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, model_validator

from gateway.configbase import Strict
from gateway.redact import SECRET_TYPES, find_secrets, placeholder
from plugins.guard.scanner import Finding

_NUMERIC_TAIL = re.compile(r"[\d+(][\d \-()]*$")
_KEY_BEGIN = "-----BEGIN"
_KEY_END = re.compile(r"-----END (?:[A-Z0-9]+ )*PRIVATE KEY-----")


class OutputConfig(Strict):
    enabled: bool = True
    #: What a secret in the answer does: redact it, end the answer (block), or only flag it.
    secrets: Literal["block", "redact", "flag"] = "redact"
    #: Secret types looked for in answers (e-mail and phone are common in honest answers).
    secret_types: tuple[str, ...] = ("api_key", "private_key", "jwt", "credit_card")
    #: A string planted in your system prompt; seeing it in an answer means the prompt leaked.
    canary: str = Field("", repr=False)
    canary_action: Literal["block", "redact", "flag"] = "block"
    #: Characters held back while streaming so a match split across chunks is still caught.
    window_chars: int = Field(64, ge=8, le=4096)
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
        if len(self.canary) > self.window_chars:
            raise ValueError("output.window_chars must be at least as long as output.canary")
        return self


class OutputGuard:
    def __init__(self, cfg: OutputConfig) -> None:
        self.cfg = cfg
        self.types = frozenset(cfg.secret_types)
        self._canary = cfg.canary.lower()

    # --- one complete text (non-streamed answers, or a released span) ---------------------------

    def _canary_pass(self, text: str, cut: int, findings: list[Finding]) -> tuple[str, int]:
        """Canaries ending before ``cut`` become findings; one straddling it moves ``cut``."""
        if not self._canary:
            return text, cut
        low = text.lower()
        size = len(self._canary)
        starts = []
        i = low.find(self._canary)
        while i != -1:
            if i + size > cut:
                cut = min(cut, i) if i < cut else cut
                break
            starts.append(i)
            i = low.find(self._canary, i + size)
        if not starts:
            return text, cut
        findings.append(Finding("output", "system_prompt_leak", self.cfg.canary_action, "canary"))
        if self.cfg.canary_action != "redact":
            return text, cut
        mark = placeholder("canary")
        for i in reversed(starts):
            text = text[:i] + mark + text[i + size :]
        return text, cut + len(starts) * (len(mark) - size)

    def check(self, text: str) -> tuple[str, list[Finding]]:
        """The text with redactions applied (when the actions say so), and the findings."""
        findings: list[Finding] = []
        text, cut = self._canary_pass(text, len(text), findings)
        return self._redact(text, cut, findings)[0], findings

    def _redact(self, text: str, cut: int, findings: list[Finding]) -> tuple[str, int]:
        """Handle secrets ending before ``cut``; a secret straddling it moves ``cut`` back."""
        hits = find_secrets(text, self.types)
        out: list[str] = []
        pos = 0
        for h in hits:
            if h.start >= cut:
                break
            if h.end > cut:
                cut = h.start
                break
            findings.append(Finding("output", h.type, self.cfg.secrets, h.type))
            if self.cfg.secrets == "redact":
                out.append(text[pos : h.start])
                out.append(placeholder(h.type))
                pos = h.end
        if pos == 0:
            return text, cut
        # Redaction shifts offsets: recompute ``cut`` in the rewritten text.
        tail = text[pos:]
        head = "".join(out)
        return head + tail, len(head) + (cut - pos)

    # --- streaming -----------------------------------------------------------------------

    def _safe_cut(self, text: str) -> int:
        n = len(text)
        cut = n - self.cfg.window_chars
        if cut <= 0:
            return 0
        if not text[cut - 1].isspace() and not text[cut].isspace():
            ws = max(text.rfind(" ", 0, cut), text.rfind("\n", 0, cut))
            if ws >= 0:
                cut = ws + 1
            elif n < self.cfg.max_hold_chars:
                return 0
        m = _NUMERIC_TAIL.search(text, 0, cut)
        if m:
            cut = m.start()
        begin = text.rfind(_KEY_BEGIN, 0, cut)
        if begin >= 0 and not _KEY_END.search(text, begin) and n < self.cfg.max_hold_chars:
            cut = begin
        return cut

    def feed(self, held: str, text: str, final: bool) -> tuple[str, str, list[Finding]]:
        """Add ``text`` to the ``held`` text of one choice: (released, still held, findings)."""
        pending = held + text
        if not final and len(pending) <= self.cfg.window_chars:
            return "", pending, []  # all of it is still held: nothing to scan yet
        findings: list[Finding] = []
        cut = len(pending) if final else self._safe_cut(pending)
        if cut == 0:
            return "", pending, findings
        pending, cut = self._canary_pass(pending, cut, findings)
        pending, cut = self._redact(pending, cut, findings)
        return pending[:cut], pending[cut:], findings


def response_texts(response: dict[str, Any]) -> list[tuple[dict[str, Any], str]]:
    """(message, key) pairs of a non-streamed chat answer that hold text."""
    out = []
    for choice in response.get("choices") or ():
        msg = choice.get("message") if isinstance(choice, dict) else None
        if isinstance(msg, dict):
            for key in ("content", "refusal"):
                if isinstance(msg.get(key), str):
                    out.append((msg, key))
    return out
