"""OpenAI's rate-limit headers: ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}`` and
``Retry-After``."""

from __future__ import annotations

import math

from .store_base import Usage

#: Text of the parts of a duration, by value: formatting numbers (``f"{frac:03d}"``) costs
#: several times more than indexing, and two durations go out with every response.
#: Whole seconds under an hour: "0" .. "59", "1m0" .. "59m59" (3,600 short strings).
_WHOLE = tuple(str(n) if n < 60 else f"{n // 60}m{n % 60}" for n in range(3600))
#: Milliseconds as the end of a duration: "s", ".001s" .. ".999s" without trailing zeros.
_FRACTION_S = ("s", *(f".{n:03d}".rstrip("0") + "s" for n in range(1, 1000)))


def format_duration(seconds: float) -> str:
    """Go-style durations, as OpenAI sends them: ``20ms``, ``8.64s``, ``6m0s``, ``1h2m3s``."""
    ms = round(seconds * 1000)
    if ms <= 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    if ms < 3600000:  # the resets of every response: the request (1 min) and token (2) windows
        return _WHOLE[ms // 1000] + _FRACTION_S[ms % 1000]
    whole, frac = divmod(ms, 1000)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes}m{secs}" + _FRACTION_S[frac]


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


#: A limit's state for the headers: (limit, remaining, seconds to its reset); what remains is
#: a whole number, never negative (so ``str`` of it is the header).
State = tuple[float, float, float]


def tighter(a: State, b: State) -> bool:
    """Of several limits on one request, the tightest has the least left (then the smallest);
    the first of equals is kept."""
    return (a[1], a[0]) < (b[1], b[0])


def write_rate_limit_headers(
    out: dict[str, str], requests: State | None, tokens: State | None
) -> None:
    """Writes the ``x-ratelimit-*`` headers of the tightest request and token limits to ``out``
    (limit, remaining and reset of each; written out twice, and ``format_duration`` spelt out
    for the resets every response has (a second to an hour), as this runs on every request)."""
    if requests is not None:
        limit, left, reset_s = requests
        out[LIMIT_REQUESTS] = _LIMIT_TEXT.get(limit) or _limit_text(limit)
        out[REMAINING_REQUESTS] = str(left)
        ms = round(reset_s * 1000)
        out[RESET_REQUESTS] = (_WHOLE[ms // 1000] + _FRACTION_S[ms % 1000]
                               if 1000 <= ms < 3600000 else format_duration(reset_s))  # fmt: skip
    if tokens is not None:
        limit, left, reset_s = tokens
        out[LIMIT_TOKENS] = _LIMIT_TEXT.get(limit) or _limit_text(limit)
        out[REMAINING_TOKENS] = str(left)
        ms = round(reset_s * 1000)
        out[RESET_TOKENS] = (_WHOLE[ms // 1000] + _FRACTION_S[ms % 1000]
                             if 1000 <= ms < 3600000 else format_duration(reset_s))  # fmt: skip


def _tightest(usages: list[Usage]) -> State | None:
    tightest: State | None = None
    for u in usages:
        state = (u.limit, u.remaining, u.reset_s)
        if tightest is None or tighter(state, tightest):
            tightest = state
    if tightest is None:
        return None
    remaining = int(tightest[1])
    return (tightest[0], remaining if remaining > 0 else 0, tightest[2])


def add_rate_limit_headers(out: dict[str, str], requests: list[Usage], tokens: list[Usage]) -> None:
    """``write_rate_limit_headers`` of a decision's lists of limits."""
    write_rate_limit_headers(out, _tightest(requests), _tightest(tokens))


def retry_after_headers(seconds: float) -> dict[str, str]:
    # Whole seconds per RFC 9110 (never 0: "retry now" would be a lie); the openai SDK also
    # reads retry-after-ms for a precise wait.
    return {
        "retry-after": str(max(1, math.ceil(seconds))),
        "retry-after-ms": str(max(1, math.ceil(seconds * 1000))),
    }
