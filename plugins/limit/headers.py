"""OpenAI's rate-limit headers: ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}`` and
``Retry-After``."""

from __future__ import annotations

import math

from .store_base import Usage

#: Text of the parts of a duration, by value: formatting numbers (``f"{frac:03d}"``) costs
#: several times more than indexing, and two durations go out with every response.
_SECONDS = tuple(str(n) for n in range(60))  # "0" .. "59"
_MINUTES = tuple(f"{n}m" for n in range(60))  # "0m" .. "59m"
#: Milliseconds as the end of a duration: "s", ".001s" .. ".999s" without trailing zeros.
_FRACTION_S = ("s", *(f".{n:03d}".rstrip("0") + "s" for n in range(1, 1000)))


def format_duration(seconds: float) -> str:
    """Go-style durations, as OpenAI sends them: ``20ms``, ``8.64s``, ``6m0s``, ``1h2m3s``."""
    ms = round(seconds * 1000)
    if ms <= 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    if ms < 60000:  # the request window's reset, on every response
        return _SECONDS[ms // 1000] + _FRACTION_S[ms % 1000]
    if ms < 3600000:  # the token window's reset (1-2 minutes), on every response
        rest = ms % 60000
        return _MINUTES[ms // 60000] + _SECONDS[rest // 1000] + _FRACTION_S[rest % 1000]
    whole, frac = divmod(ms, 1000)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes}m{secs}" + _FRACTION_S[frac]


def _tightness(u: Usage) -> tuple[float, float]:
    """Of several limits on one request, the tightest has the least left (then the smallest)."""
    return (u.remaining, u.limit)


LIMIT_REQUESTS = "x-ratelimit-limit-requests"
REMAINING_REQUESTS = "x-ratelimit-remaining-requests"
RESET_REQUESTS = "x-ratelimit-reset-requests"
LIMIT_TOKENS = "x-ratelimit-limit-tokens"
REMAINING_TOKENS = "x-ratelimit-remaining-tokens"
RESET_TOKENS = "x-ratelimit-reset-tokens"

#: ``str(int(limit))`` by limit: limits come from the configuration, so few distinct values,
#: and the same ones on every response.
_LIMIT_TEXT: dict[float, str] = {}


def _limit_text(limit: float) -> str:
    text = _LIMIT_TEXT.get(limit)
    if text is None:
        if len(_LIMIT_TEXT) >= 1024:
            _LIMIT_TEXT.clear()
        text = _LIMIT_TEXT[limit] = str(int(limit))
    return text


def add_rate_limit_headers(out: dict[str, str], requests: list[Usage], tokens: list[Usage]) -> None:
    """Adds the ``x-ratelimit-*`` headers of the tightest request and token limits to ``out``
    (limit, remaining and reset of each; written out twice, as this runs on every request)."""
    if requests:
        u = requests[0] if len(requests) == 1 else min(requests, key=_tightness)
        out[LIMIT_REQUESTS] = _LIMIT_TEXT.get(u.limit) or _limit_text(u.limit)
        remaining = int(u.remaining)
        out[REMAINING_REQUESTS] = str(remaining) if remaining > 0 else "0"
        out[RESET_REQUESTS] = format_duration(u.reset_s)
    if tokens:
        u = tokens[0] if len(tokens) == 1 else min(tokens, key=_tightness)
        out[LIMIT_TOKENS] = _LIMIT_TEXT.get(u.limit) or _limit_text(u.limit)
        remaining = int(u.remaining)
        out[REMAINING_TOKENS] = str(remaining) if remaining > 0 else "0"
        out[RESET_TOKENS] = format_duration(u.reset_s)


def retry_after_headers(seconds: float) -> dict[str, str]:
    # Whole seconds per RFC 9110 (never 0: "retry now" would be a lie); the openai SDK also
    # reads retry-after-ms for a precise wait.
    return {
        "retry-after": str(max(1, math.ceil(seconds))),
        "retry-after-ms": str(max(1, math.ceil(seconds * 1000))),
    }
