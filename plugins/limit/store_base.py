"""What every store does, and the arithmetic both stores share.

Algorithms (identical in memory and in Redis, so a test on one holds for the other):

* requests per minute: the ``limits`` library's *moving window* (a list of the admission times,
  newest first, trimmed to the limit). Exact: no 2x burst at window edges.
* tokens per minute: a *sliding window counter* (this minute's tokens plus the previous
  minute's, weighted by how much of it still overlaps the last 60 s). O(1) per key whatever the
  token volume, and a reservation can be adjusted afterwards by ``INCRBY`` on its minute.
* in flight: a set of slot ids with an expiry each (Redis: a sorted set scored by expiry).
* budgets: dollars spent per scope and UTC day / month, plus the worst-case cost of each
  request in flight, held until its real cost is known (Redis: a hash of the holds and a sorted
  set of their expiries, so a crashed replica's holds lapse after the slot TTL).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

from .scopes import Check, Plan

WINDOW = 60.0


@dataclass(slots=True)
class Reservation:
    """What an admission took, to be given back or settled in ``on_response``."""

    slot_id: str
    tokens: int
    #: Token counter keys of the minute the reservation was taken in.
    tpm_keys: list[str] = field(default_factory=list)
    parallel_keys: list[str] = field(default_factory=list)
    #: Budget checks (the period keys of the spend are derived at settlement time).
    budget: list[Check] = field(default_factory=list)
    #: Dollars held against the budgets until the answer's cost is known (its worst case), and
    #: the keys of the periods it is held in.
    reserved_usd: float = 0.0
    budget_keys: list[str] = field(default_factory=list)


@dataclass(slots=True)
class Usage:
    """State of one limit after the decision, for the ``x-ratelimit-*`` headers."""

    limit: float
    remaining: float
    reset_s: float


#: Retry-After when a budget is not spent but fully held by requests in flight: holds end
#: with their requests, which we can't foresee.
HELD_RETRY_S = 1.0


def held_check(c: Check) -> Check:
    """The refusal of a budget that requests in flight hold (not one that is spent)."""
    return Check("budget_held", c.scope, c.key, c.limit)


@dataclass(slots=True)
class Decision:
    admitted: bool
    #: The check that refused the request, with the seconds until it may pass.
    denied: Check | None = None
    retry_after: float | None = None
    requests: list[Usage] = field(default_factory=list)
    tokens: list[Usage] = field(default_factory=list)
    reservation: Reservation | None = None


class Store(Protocol):
    async def admit(
        self, plan: Plan, *, now: float, slot_id: str, tokens: int, slot_ttl: float,
        reserve_usd: float = 0.0,
    ) -> Decision: ...  # fmt: skip

    async def settle(
        self, res: Reservation, *, now: float, used_tokens: int, cost_usd: float
    ) -> None: ...

    async def peek(self, plan: Plan, *, now: float) -> Decision:
        """The request and token limits' state (``requests``, ``tokens``), changing nothing."""
        ...

    async def close(self) -> None: ...


# --- tokens: sliding window counter -------------------------------------------------------


def window_index(now: float) -> int:
    return math.floor(now / WINDOW)


def tpm_used(prev: float, cur: float, elapsed: float) -> float:
    return prev * (WINDOW - elapsed) / WINDOW + cur


def tpm_retry_after(prev: float, cur: float, elapsed: float, limit: float, tokens: int) -> float:
    """Seconds until ``tokens`` fit, if nothing else is admitted meanwhile."""
    room = limit - tokens
    if cur <= room:
        if prev <= 0:
            return 0.0
        # prev * (W - e) / W <= room - cur  <=>  e >= W * (1 - (room - cur) / prev)
        return max(0.0, WINDOW * (1 - (room - cur) / prev) - elapsed)
    # Only once this minute is the previous one does its weight start to fall.
    return (WINDOW - elapsed) + max(0.0, WINDOW * (1 - room / cur))


def tpm_usage(prev: float, cur: float, elapsed: float, limit: float) -> Usage:
    if cur > 0:
        reset = 2 * WINDOW - elapsed
    elif prev > 0:
        reset = WINDOW - elapsed
    else:
        reset = 0.0
    # max(0.0, floor(limit - tpm_used(...))), spelt out: this runs on every admission.
    remaining = math.floor(limit - (prev * (WINDOW - elapsed) / WINDOW + cur))
    return Usage(limit, remaining if remaining > 0 else 0.0, reset)


# --- budgets: UTC periods -------------------------------------------------------------------


#: The UTC day and month last asked about, per kind: (start, end, key suffix). Every request
#: of a budget rule needs its period twice, and formatting a date costs more than the rest of
#: the check.
_PERIODS: dict[str, tuple[float, float, str]] = {}


def period(kind: str, now: float) -> tuple[float, float, str]:
    """``(start, end, key suffix)`` of the UTC day (``budget_day``) or month now falls in."""
    last = _PERIODS.get(kind)
    if last is not None and last[0] <= now < last[1]:
        return last
    t = datetime.fromtimestamp(now, UTC)
    if kind == "budget_day":
        start = datetime(t.year, t.month, t.day, tzinfo=UTC).timestamp()
        found = (start, start + 86400, f"/day/{t:%Y-%m-%d}")
    else:
        start = datetime(t.year, t.month, 1, tzinfo=UTC).timestamp()
        nxt = datetime(t.year + (t.month == 12), t.month % 12 + 1, 1, tzinfo=UTC)
        found = (start, nxt.timestamp(), f"/month/{t:%Y-%m}")
    _PERIODS[kind] = found
    return found


def period_key(check: Check, now: float) -> str:
    return check.key + period(check.kind, now)[2]


def period_end(check: Check, now: float) -> float:
    return period(check.kind, now)[1]
