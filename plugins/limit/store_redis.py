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

    async def admit(
        self, plan: Plan, *, now: float, slot_id: str, tokens: int, slot_ttl: float,
        reserve_usd: float = 0.0,
    ) -> Decision:  # fmt: skip
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
        ]
        checks: list[Check] = [*plan.rpm, *plan.tpm, *plan.parallel, *plan.budget]
        args: list[Any] = [
            _f(now), slot_id, tokens, _f(now + slot_ttl), math.ceil(slot_ttl * 1000), _f(WINDOW),
            len(plan.rpm), len(plan.tpm), len(plan.parallel), len(plan.budget),
            _f(reserve_usd if plan.budget else 0.0), *(_f(c.limit) for c in checks),
        ]  # fmt: skip
        out = await self._call(self._admit, keys, args)
        elapsed = now - w * WINDOW
        if int(out[0]) == 0:
            kind, i = out[1], int(out[2]) - 1
            requests, token_usage = _limits_state(plan, out, 5, now, elapsed)
            denied: Check
            if kind == "rpm":
                denied = plan.rpm[i]
                retry = float(out[3]) + WINDOW - now
            elif kind == "tpm":
                denied = plan.tpm[i]
                prev, cur = float(out[3]), float(out[4])
                retry = tpm_retry_after(prev, cur, elapsed, denied.limit, tokens)
            elif kind == "par":
                denied, retry = plan.parallel[i], PARALLEL_RETRY_S
            elif kind == "held":
                denied, retry = held_check(plan.budget[i]), HELD_RETRY_S
            else:
                denied = plan.budget[i]
                retry = period_end(denied, now) - now
            return Decision(False, denied, retry, requests, token_usage)
        res = Reservation(slot_id, tokens, budget=plan.budget)
        if reserve_usd > 0 and budget_keys:
            res.reserved_usd = reserve_usd
            res.budget_keys = list(dict.fromkeys(budget_keys))
        res.tpm_keys = list(dict.fromkeys(p + f"{c.key}/{w}" for c in plan.tpm))
        res.parallel_keys = list(dict.fromkeys(p + c.key for c in plan.parallel))
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

    async def release(self, res: Reservation) -> None:
        """Free the reservation's concurrency slots and end its budget holds only (what a
        settlement that may already have been applied can safely repeat)."""
        held = res.budget_keys
        if res.parallel_keys or held:
            keys = [
                *res.parallel_keys, *(k + "/held" for k in held),
                *(k + "/held-until" for k in held),
            ]  # fmt: skip
            await self._call(self._release, keys, [res.slot_id, len(res.parallel_keys), len(held)])

    async def close(self) -> None:
        await self.client.aclose()
