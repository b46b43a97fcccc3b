"""A streamed choice's ``logprobs`` kept in step with the text the output guard holds back:
each entry's ``token`` is a piece of the text, so it goes out only with the text it spells,
and never where that text held a finding.

Each entry's ``top_logprobs`` alternatives are text the model almost wrote, and a client can
read them in place of the chosen tokens. :class:`Alternatives` reads them so (each alternative
after the chosen text, the alternatives of one rank in a row, and each one's ``bytes``); where
such a reading (or the chosen text) holds the start of a secret of a checked type (a key's
prefix, "eyJ", a key block's header, nine digits in a row, the first half of the canary ...),
the alternatives of every entry released in that step become ``[]``. Alternatives that only
agree with the text around them stay (a classifier's "Yes" / "No").
"""

from __future__ import annotations

import re
from typing import Any

from plugins.guard.bidi import has_bidi, strip_all_bidi
from plugins.guard.output import canary_pattern, seen_text

#: How each checked type's secrets begin: no secret of the type can be spelt without it.
TELLTALES = {
    "api_key": r"sk-|sk_live_|rk_live_|AKIA|ASIA|gh[pousr]_|github_pat_|xox[abposr]-|AIza",
    "jwt": r"eyJ",
    "private_key": r"-----BEGIN",
    "credit_card": r"\d(?:[ \-]?\d){8}",
    "email": r"[A-Za-z0-9]@",
    "iban": r"[A-Z]{2}\d\d",
    "phone": r"\+\d",
}


class Alternatives:
    """Reads ``top_logprobs`` alternatives for the starts of secrets (see the module)."""

    def __init__(self, types: tuple[str, ...], canary: str) -> None:
        parts = [TELLTALES[t] for t in types if t in TELLTALES]
        self.keep = 16  # characters of each reading carried to the next entry
        alnum = [i for i, c in enumerate(canary) if c.isalnum()]
        if alnum:
            half = alnum[min(len(alnum), max(3, (len(alnum) + 1) // 2)) - 1]
            pattern, span = canary_pattern(canary[: half + 1])
            if pattern is not None:
                parts.append(f"(?i:{pattern.pattern})")
                self.keep = max(self.keep, span)
        self.rx = re.compile("|".join(parts)) if parts else None

    def _hit(self, text: str) -> bool:
        assert self.rx is not None
        if not text.isascii():
            text = seen_text(text)
        return self.rx.search(text) is not None

    def screen(self, rows: list[str], entries: list[Any]) -> list[str]:
        """Blank the alternatives of ``entries`` (released together) where a reading holds the
        start of a secret; ``rows``: the end of each reading so far (0: the chosen text, then
        two per rank: its tokens, its bytes), returned updated."""
        if self.rx is None:
            return rows
        rows = list(rows) or [""]
        hit = False
        keep = self.keep
        for entry in entries:
            if type(entry) is not dict:
                continue
            token = entry.get("token")
            chosen = token if type(token) is str else ""
            alts = entry.get("top_logprobs")
            alts = alts if type(alts) is list else ()
            width = 2 * len(alts) + 1  # a row per rank for tokens, and one for bytes
            while len(rows) < width:
                rows.append(rows[0])
            readings = [rows[0] + chosen]
            for r, alt in enumerate(alts):
                token, text = _readings(alt, chosen)
                for k, seen in enumerate((token, text)):
                    row = 1 + 2 * r + k
                    if k == 0 or seen != token:
                        readings += (rows[0] + seen, rows[row] + seen, rows[row] + chosen)
                    rows[row] = (rows[row] + seen)[-keep:]
            for r in range(width, len(rows)):
                rows[r] = (rows[r] + chosen)[-keep:]
            rows[0] = (rows[0] + chosen)[-keep:]
            if not hit:
                hit = any(self._hit(t) for t in readings)
        if hit:
            for entry in entries:
                if type(entry) is dict and entry.get("top_logprobs"):
                    entry["top_logprobs"] = []
            rows = [rows[0]]  # what a reader sees at every rank now: the chosen text
        return rows


def _readings(alt: Any, chosen: str) -> tuple[str, str]:
    """An alternative's token, and its ``bytes`` as text (the chosen token when either is
    missing)."""
    if type(alt) is not dict:
        return chosen, chosen
    token = alt.get("token")
    token = token if type(token) is str else chosen
    raw = alt.get("bytes")
    text = token
    if type(raw) is list and raw:
        try:
            text = bytes(raw).decode("utf-8", "ignore")
        except (TypeError, ValueError):
            pass
    return token, text


def clean_tokens(entries: list[Any]) -> None:
    """Bidi controls out of the entries' and alternatives' tokens (and their ``bytes``): the
    text they spell lost them too (plugins.guard.bidi)."""
    for entry in entries:
        if type(entry) is not dict:
            continue
        alts = entry.get("top_logprobs")
        for item in (entry, *(alts if type(alts) is list else ())):
            token = item.get("token") if type(item) is dict else None
            if type(token) is str and has_bidi(token):
                item["token"] = token = strip_all_bidi(token)
                if item.get("bytes") is not None:
                    item["bytes"] = list(token.encode())


def queued(state: dict[str, Any], idx: Any) -> bool:
    """Whether logprobs entries of a choice's text wait for the text they spell (``state``:
    the guard's scratch of the request)."""
    pending = state.get("logprobs")
    return bool(pending and pending.get((idx, "content")))


def _sent(
    state: dict[Any, Any], idx: Any, field: str, out: list[Any], reader: Alternatives
) -> None:
    """Entries about to go out: bidi controls out of their tokens, alternatives screened."""
    if not out:
        return
    clean_tokens(out)
    key = (idx, field, "rows")
    state[key] = reader.screen(state.get(key) or [], out)


def release_logprobs(
    scratch: dict[str, Any],
    idx: Any,
    field: str,
    logprobs: dict[str, Any],
    consumed: int,
    found: bool,
    reader: Alternatives,
) -> None:
    """Set ``logprobs[field]`` to the entries whose text has now been released (``consumed``:
    characters of the upstream's text released so far in this step), none where that text held
    a finding (they would carry the secret out); the rest wait in ``scratch``."""
    entries = logprobs.get(field)
    state = scratch.setdefault("logprobs", {})
    queue: list[Any] = state.setdefault((idx, field), [])
    if type(entries) is list:
        queue.extend(entries)
    elif not queue:
        return
    out: list[Any] = []
    total = state.get((idx, field, "released"), 0) + consumed
    covered = state.get((idx, field, "covered"), 0)
    while queue:
        token = queue[0].get("token") if type(queue[0]) is dict else None
        size = len(token) if type(token) is str else 0
        if covered + size > total:
            break
        covered += size
        out.append(queue.pop(0))
    state[(idx, field, "released")] = total
    state[(idx, field, "covered")] = covered
    if found:
        out = []
    _sent(state, idx, field, out, reader)
    logprobs[field] = out


def flush_logprobs(
    scratch: dict[str, Any], idx: Any, choice: dict[str, Any], found: set[Any],
    reader: Alternatives,
) -> None:  # fmt: skip
    """At a choice's ``finish_reason``: the entries still queued go out in that chunk, except
    those of a text just flushed that held a finding (``found``: its parts)."""
    state = scratch.get("logprobs")
    if not state:
        return
    for field in ("content", "refusal"):
        rest = state.get((idx, field))
        if rest and field in found:
            rest.clear()  # never the tokens of a finding
        elif rest:
            logprobs = choice.get("logprobs")
            if not isinstance(logprobs, dict):
                logprobs = choice["logprobs"] = {"content": None, "refusal": None}
            entries = logprobs.get(field)
            _sent(state, idx, field, rest, reader)
            logprobs[field] = [*(entries if type(entries) is list else ()), *rest]
            rest.clear()


def screen_answer(choice: dict[str, Any], reader: Alternatives) -> None:
    """A non-streamed choice's logprobs: tokens without bidi controls, and alternatives
    screened word by word (a new step at each token that starts with a space), as a stream
    releases them."""
    logprobs = choice.get("logprobs")
    if not isinstance(logprobs, dict):
        return
    for field in ("content", "refusal"):
        entries = logprobs.get(field)
        if type(entries) is not list or not entries:
            continue
        clean_tokens(entries)
        rows: list[str] = []
        step: list[Any] = []
        for entry in entries:
            token = entry.get("token") if type(entry) is dict else None
            if step and type(token) is str and token[:1].isspace():
                rows = reader.screen(rows, step)
                step = []
            step.append(entry)
        reader.screen(rows, step)
