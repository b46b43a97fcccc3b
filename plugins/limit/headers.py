"""OpenAI's rate-limit headers: ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}`` and
``Retry-After``."""

from __future__ import annotations

import math

from .store_base import Usage


def format_duration(seconds: float) -> str:
    """Go-style durations, as OpenAI sends them: ``20ms``, ``8.64s``, ``6m0s``, ``1h2m3s``."""
    ms = round(seconds * 1000)
    if ms <= 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    whole, frac = divmod(ms, 1000)
    if ms < 60000:  # the usual reset time, on every response: the short way
        return f"{whole}.{frac:03d}".rstrip("0") + "s" if frac else f"{whole}s"
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    sec_text = f"{secs}.{frac:03d}".rstrip("0") if frac else str(secs)
    return (f"{hours}h" if hours else "") + f"{minutes}m{sec_text}s"


def tightest(usages: list[Usage]) -> Usage | None:
    """Of several limits on one request, the one with the least left (then the smallest)."""
    if len(usages) < 2:
        return usages[0] if usages else None
    return min(usages, key=lambda u: (u.remaining, u.limit))


_NAMES = {
    suffix: (f"x-ratelimit-limit-{suffix}", f"x-ratelimit-remaining-{suffix}",
             f"x-ratelimit-reset-{suffix}")
    for suffix in ("requests", "tokens")
}  # fmt: skip


def rate_limit_headers(requests: list[Usage], tokens: list[Usage]) -> dict[str, str]:
    out: dict[str, str] = {}
    for (limit, remaining, reset), usages in (
        (_NAMES["requests"], requests),
        (_NAMES["tokens"], tokens),
    ):
        u = usages[0] if len(usages) == 1 else tightest(usages)
        if u is not None:
            out[limit] = str(int(u.limit))
            out[remaining] = str(max(0, int(u.remaining)))
            out[reset] = format_duration(u.reset_s)
    return out


def retry_after_headers(seconds: float) -> dict[str, str]:
    # Whole seconds per RFC 9110 (never 0: "retry now" would be a lie); the openai SDK also
    # reads retry-after-ms for a precise wait.
    return {
        "retry-after": str(max(1, math.ceil(seconds))),
        "retry-after-ms": str(max(1, math.ceil(seconds * 1000))),
    }
