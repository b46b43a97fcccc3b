"""The Redis store: counters shared by every replica, one round trip per admission and one per
settlement, each a Lua script (atomic in Redis, so N replicas together admit no more than the
limit).

The request window uses the very layout of the ``limits`` library's moving window (its
``acquire_moving_window.lua``: a list of timestamps, newest first, trimmed to the limit, keyed
``<prefix>:<RateLimitItem.key_for(...)>``), so ``limits``' own ``MovingWindowRateLimiter`` over
``async+redis://`` with the same ``key_prefix`` reads our keys. We run it inside one script
instead of calling ``limits`` because ``limits`` costs a round trip per limit, cannot check
several limits all-or-nothing, and has no token reservations.

Clocks: timestamps come from the gateway (as ``limits`` does), so replicas need NTP-synced
clocks; skew of a few ms only shifts window edges by as much.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Any

from redis.exceptions import RedisError

from gateway.redis_client import redis_client

from .redis_scripts import ADMIT_LUA, RELEASE_LUA, SETTLE_LUA
from .scopes import Check, Plan
from .store_base import (
    HELD_RETRY_S,
    WINDOW,
    Decision,
    Reservation,
    Usage,
    held_check,
    period_end,
    period_key,
    tpm_retry_after,
    tpm_usage,
    window_index,
)
from .store_memory import PARALLEL_RETRY_S

log = logging.getLogger("gateway.limit")


def _limits_state(
    plan: Plan, out: list[Any], pos: int, now: float, elapsed: float
) -> tuple[list[Usage], list[Usage]]:
    """The request and token limits' state in a refusal's reply (for the headers)."""
    requests: list[Usage] = []
    for c in plan.rpm:
        count, oldest = int(out[pos]), float(out[pos + 1])
        pos += 2
        reset = oldest + WINDOW - now if count else 0.0
        requests.append(Usage(c.limit, max(c.limit - count, 0), reset))
    tokens: list[Usage] = []
    for c in plan.tpm:
        prev, cur = float(out[pos]), float(out[pos + 1])
        pos += 2
        tokens.append(tpm_usage(prev, cur, elapsed, c.limit))
    return requests, tokens


class StoreUnavailable(Exception):
    """The store could not be asked (down, timed out, or skipped after a recent failure).

    ``sent``: whether the command may have reached Redis (and so may have been applied): False
    only when the store was skipped after a recent failure."""

    def __init__(self, message: str, *, sent: bool = True) -> None:
        super().__init__(message)
        self.sent = sent


def _f(x: float) -> str:
    return repr(float(x))


class RedisStore:
    def __init__(self, url: str, *, prefix: str, socket_timeout: float, retry_after: float) -> None:
        self.prefix = prefix + ":"
        self.timeout = socket_timeout
        self.retry_after = retry_after
        # No client-side retries: a dead Redis must cost one short timeout, not several.
        self.client: Any = redis_client(url, socket_timeout, decode_responses=True)
        self._admit = self.client.register_script(ADMIT_LUA)
        self._settle = self.client.register_script(SETTLE_LUA)
        self._release = self.client.register_script(RELEASE_LUA)
        self._down_until = 0.0

    async def _call(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        if time.monotonic() < self._down_until:
            raise StoreUnavailable("store marked down after a recent error", sent=False)
        try:
            # Socket timeouts bound each read; this bounds the whole call (connect + EVALSHA,
            # + EVAL after a Redis restart forgot the script).
            async with asyncio.timeout(self.timeout * 4):
                return await script(keys=keys, args=args)
        except (RedisError, OSError, TimeoutError) as e:
            self._down_until = time.monotonic() + self.retry_after
            raise StoreUnavailable(type(e).__name__) from e

    async def ping(self) -> None:
        try:
            async with asyncio.timeout(self.timeout * 4):
                await self.client.ping()
        except (RedisError, OSError, TimeoutError) as e:
            raise StoreUnavailable(type(e).__name__) from e

    def _admit_keys(self, plan: Plan, now: float, slot_id: str) -> tuple[list[str], list[str]]:
        """The admission script's keys, and the budget period keys among them."""
        p = self.prefix
        w = window_index(now)
        budget_keys = [p + period_key(c, now) for c in plan.budget]
        keys = [
            *(p + c.key for c in plan.rpm),
            *(p + f"{c.key}/{w}" for c in plan.tpm),
            *(p + f"{c.key}/{w - 1}" for c in plan.tpm),
            *(p + c.key for c in plan.parallel),
            *budget_keys,
            *(k + "/held" for k in budget_keys),
            *(k + "/held-until" for k in budget_keys),
            self._abandoned_key(slot_id),
        ]
        return keys, budget_keys

    def _abandoned_key(self, slot_id: str) -> str:
        return f"{self.prefix}abandoned/{slot_id}"

    def reservation(
        self, plan: Plan, *, now: float, slot_id: str, tokens: int, reserve_usd: float = 0.0,
        budget_keys: list[str] | None = None,
    ) -> Reservation:  # fmt: skip
        """What ``admit`` takes when it admits: also what to give back for an admission whose
        outcome is unknown (it timed out, and Redis may still run it)."""
        p = self.prefix
        res = Reservation(slot_id, tokens, budget=plan.budget)
        if reserve_usd > 0 and plan.budget:
            if budget_keys is None:
                budget_keys = [p + period_key(c, now) for c in plan.budget]
            res.reserved_usd = reserve_usd
            res.budget_keys = list(dict.fromkeys(budget_keys))
        if plan.tpm:
            w = window_index(now)
            res.tpm_keys = list(dict.fromkeys(p + f"{c.key}/{w}" for c in plan.tpm))
        res.parallel_keys = list(dict.fromkeys(p + c.key for c in plan.parallel))
        return res

    def _args(
        self, plan: Plan, now: float, slot_id: str, tokens: int, slot_ttl: float,
        reserve_usd: float, peek: bool,
    ) -> list[Any]:  # fmt: skip
        checks: list[Check] = [*plan.rpm, *plan.tpm, *plan.parallel, *plan.budget]
        return [
            _f(now), slot_id, tokens, _f(now + slot_ttl), math.ceil(slot_ttl * 1000), _f(WINDOW),
            len(plan.rpm), len(plan.tpm), len(plan.parallel), len(plan.budget),
            _f(reserve_usd if plan.budget else 0.0), "1" if peek else "0",
            *(_f(c.limit) for c in checks),
        ]  # fmt: skip

    async def peek(self, plan: Plan, *, now: float) -> Decision:
        """The request and token limits' state, changing nothing (for the headers of a refusal
        decided without the store)."""
        keys, _ = self._admit_keys(plan, now, "-")
        out = await self._call(self._admit, keys, self._args(plan, now, "-", 0, 1.0, 0.0, True))
        elapsed = now - window_index(now) * WINDOW
        requests, tokens = _limits_state(plan, out, 2, now, elapsed)
        return Decision(False, None, None, requests, tokens)

    async def admit(
        self, plan: Plan, *, now: float, slot_id: str, tokens: int, slot_ttl: float,
        reserve_usd: float = 0.0,
    ) -> Decision:  # fmt: skip
        keys, budget_keys = self._admit_keys(plan, now, slot_id)
        args = self._args(plan, now, slot_id, tokens, slot_ttl, reserve_usd, False)
        out = await self._call(self._admit, keys, args)
        w = window_index(now)
        elapsed = now - w * WINDOW
        status = int(out[0])
        if status == -1:  # (a slot id given up on before: cannot happen to a fresh one)
            raise StoreUnavailable("admission already abandoned", sent=False)
        if status == 0:
            nfail = int(out[1])
            requests, token_usage = _limits_state(plan, out, 2 + 4 * nfail, now, elapsed)
            # Of the failing checks, the one with the longest wait (the first of equals): a
            # client that waits for it does not run into another.
            denied: Check | None = None
            retry = -1.0
            for j in range(nfail):
                kind, i, a, b = out[2 + 4 * j : 6 + 4 * j]
                i = int(i) - 1
                c: Check
                if kind == "rpm":
                    c, wait = plan.rpm[i], float(a) + WINDOW - now
                elif kind == "tpm":
                    c = plan.tpm[i]
                    wait = tpm_retry_after(float(a), float(b), elapsed, c.limit, tokens)
                elif kind == "par":
                    c, wait = plan.parallel[i], PARALLEL_RETRY_S
                elif kind == "held":
                    c, wait = held_check(plan.budget[i]), HELD_RETRY_S
                else:
                    c = plan.budget[i]
                    wait = period_end(c, now) - now
                if wait > retry:
                    denied, retry = c, wait
            return Decision(False, denied, retry, requests, token_usage)
        res = self.reservation(
            plan, now=now, slot_id=slot_id, tokens=tokens, reserve_usd=reserve_usd,
            budget_keys=budget_keys,
        )  # fmt: skip
        decision = Decision(True, reservation=res)
        pos = 1
        for c in plan.rpm:
            count, oldest = int(out[pos]), float(out[pos + 1])
            decision.requests.append(Usage(c.limit, c.limit - count, oldest + WINDOW - now))
            pos += 2
        for c in plan.tpm:
            prev, cur = float(out[pos]), float(out[pos + 1])
            decision.tokens.append(tpm_usage(prev, cur, elapsed, c.limit))
            pos += 2
        return decision

    async def settle(
        self, res: Reservation, *, now: float, used_tokens: int, cost_usd: float
    ) -> None:
        periods = {self.prefix + period_key(c, now): period_end(c, now) for c in res.budget}
        held = res.budget_keys
        keys = [
            *res.tpm_keys, *res.parallel_keys, *periods,
            *(k + "/held" for k in held), *(k + "/held-until" for k in held),
        ]  # fmt: skip
        # Spend keys outlive their period by a day, for operators to read after it ends.
        ttls = [math.ceil(end - now) + 86400 for end in periods.values()]
        args: list[Any] = [
            res.slot_id, used_tokens - res.tokens, _f(cost_usd),
            len(res.tpm_keys), len(res.parallel_keys), len(periods), len(held), *ttls,
        ]  # fmt: skip
        await self._call(self._settle, keys, args)

    async def release(self, res: Reservation, *, abandon_ttl: float | None = None) -> None:
        """Free the reservation's concurrency slots and end its budget holds only (what a
        settlement that may already have been applied can safely repeat).

        ``abandon_ttl``: the reservation is that of an admission that timed out (Redis may not
        have run it yet): also mark its slot abandoned for that long, so that if Redis runs the
        admission only after this, it takes nothing."""
        held = res.budget_keys
        if res.parallel_keys or held or abandon_ttl is not None:
            keys = [
                *res.parallel_keys, *(k + "/held" for k in held),
                *(k + "/held-until" for k in held),
            ]  # fmt: skip
            args: list[Any] = [res.slot_id, len(res.parallel_keys), len(held)]
            if abandon_ttl is not None:
                keys.append(self._abandoned_key(res.slot_id))
                args.append(max(1, math.ceil(abandon_ttl * 1000)))
            await self._call(self._release, keys, args)

    async def close(self) -> None:
        await self.client.aclose()
