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

# Ends one budget hold: a hash of holds (slot -> dollars, plus their sum under "=total", so an
# admission reads one field, not every hold) and the sorted set of their expiries.
_UNHOLD_LUA = """
local function unhold(hk, xk, s)
  local v = redis.call('hget', hk, s)
  if v then
    redis.call('hdel', hk, s)
    if redis.call('hlen', hk) <= 1 then
      redis.call('hdel', hk, '=total')  -- nothing held: no rounding left behind either
    else
      redis.call('hincrbyfloat', hk, '=total', -tonumber(v))
    end
  end
  redis.call('zrem', xk, s)
end
"""

# KEYS: rpm (nr), tpm this minute (nt), tpm previous minute (nt), parallel (np), budget spend
# (nb), budget holds (nb: a hash slot -> dollars), their expiries (nb: a sorted set).
# ARGV: now, slot id, tokens, slot expiry, slot ttl ms, window, nr, nt, np, nb, dollars to hold,
# then the limits in the same order as the keys (tpm once).
ADMIT_LUA = (
    _UNHOLD_LUA
    + """
local now = tonumber(ARGV[1])
local slot = ARGV[2]
local tokens = tonumber(ARGV[3])
local slot_expiry = tonumber(ARGV[4])
local slot_ttl_ms = tonumber(ARGV[5])
local win = tonumber(ARGV[6])
local nr, nt, np, nb = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10])
local hold = tonumber(ARGV[11])
local la = 11
local kt, ktp, kp, kb = nr, nr + nt, nr + 2 * nt, nr + 2 * nt + np
local elapsed = now - math.floor(now / win) * win

-- The index of the oldest entry of a request window still in the window (-1: none), by a
-- binary search as limits' moving_window.lua does.
local function oldest(key, limit)
  local lo, hi, idx = 0, math.min(limit, redis.call('llen', key)) - 1, -1
  while lo <= hi do
    local mid = math.floor((lo + hi) / 2)
    local v = tonumber(redis.call('lindex', key, mid))
    if v and v > now - win then idx = mid; lo = mid + 1 else hi = mid - 1 end
  end
  return idx
end

-- A refusal: {0, kind, index, a, b}, then each request limit's count in the window and its
-- oldest entry, then each token limit's previous and current minute (for the headers).
local function refuse(kind, i, a, b)
  local out = {0, kind, i, a or '0', b or '0'}
  for j = 1, nr do
    local key = KEYS[j]
    local idx = oldest(key, tonumber(ARGV[la + j]))
    out[#out + 1] = idx + 1
    out[#out + 1] = idx >= 0 and redis.call('lindex', key, idx) or '0'
  end
  for j = 1, nt do
    out[#out + 1] = redis.call('get', KEYS[ktp + j]) or '0'
    out[#out + 1] = redis.call('get', KEYS[kt + j]) or '0'
  end
  return out
end

for i = 1, nr do
  local limit = tonumber(ARGV[la + i])
  local entry = redis.call('lindex', KEYS[i], limit - 1)
  if entry and tonumber(entry) > now - win then
    return refuse('rpm', i, entry)
  end
end
local tp = {}
for i = 1, nt do
  local limit = tonumber(ARGV[la + nr + i])
  local cur = tonumber(redis.call('get', KEYS[kt + i]) or '0')
  local prev = tonumber(redis.call('get', KEYS[ktp + i]) or '0')
  if prev * (win - elapsed) / win + cur + tokens > limit then
    return refuse('tpm', i, tostring(prev), tostring(cur))
  end
  tp[i] = {prev, cur}
end
for i = 1, np do
  local limit = tonumber(ARGV[la + nr + nt + i])
  redis.call('zremrangebyscore', KEYS[kp + i], '-inf', now)
  if redis.call('zcard', KEYS[kp + i]) >= limit then
    return refuse('par', i)
  end
end
for i = 1, nb do
  local limit = tonumber(ARGV[la + nr + nt + np + i])
  local spent = tonumber(redis.call('get', KEYS[kb + i]) or '0')
  if spent >= limit then
    return refuse('bud', i, tostring(spent))
  end
  local hk, xk = KEYS[kb + nb + i], KEYS[kb + 2 * nb + i]
  local gone = redis.call('zrangebyscore', xk, '-inf', now, 'limit', 0, 1000)
  for _, s in ipairs(gone) do
    unhold(hk, xk, s)
  end
  local held = tonumber(redis.call('hget', hk, '=total') or '0')
  if spent + held >= limit then
    return refuse('held', i)
  end
end

local out = {1}
local done = {}
for i = 1, nr do
  local key, limit = KEYS[i], tonumber(ARGV[la + i])
  redis.call('lpush', key, ARGV[1])
  redis.call('ltrim', key, 0, limit - 1)
  redis.call('expire', key, math.ceil(win))
  local idx = oldest(key, limit)  -- (>= 0: the entry just pushed is in the window)
  out[#out + 1] = idx + 1
  out[#out + 1] = redis.call('lindex', key, idx)
end
for i = 1, nt do
  local key = KEYS[kt + i]
  if not done[key] then
    done[key] = true
    redis.call('incrby', key, tokens)
    redis.call('pexpire', key, math.ceil(2 * win * 1000))
  end
  out[#out + 1] = tostring(tp[i][1])
  out[#out + 1] = tostring(tp[i][2] + tokens)
end
for i = 1, np do
  local key = KEYS[kp + i]
  redis.call('zadd', key, slot_expiry, slot)
  redis.call('pexpire', key, slot_ttl_ms)
end
if hold > 0 then
  for i = 1, nb do
    local hk, xk = KEYS[kb + nb + i], KEYS[kb + 2 * nb + i]
    if not done[hk] then
      done[hk] = true
      redis.call('hset', hk, slot, ARGV[11])
      redis.call('hincrbyfloat', hk, '=total', ARGV[11])
      redis.call('zadd', xk, slot_expiry, slot)
      redis.call('pexpire', hk, slot_ttl_ms)
      redis.call('pexpire', xk, slot_ttl_ms)
    end
  end
end
return out
"""
)

# KEYS: tpm keys of the admission minute (nt), parallel (np), budget period keys (nb), then
# the budget holds of the admission (nh hashes, then their nh sorted sets).
# ARGV: slot id, token delta, cost, nt, np, nb, nh, then one ttl (s) per budget key.
SETTLE_LUA = (
    _UNHOLD_LUA
    + """
local slot = ARGV[1]
local delta = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local nt, np, nb, nh = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
for i = 1, nh do
  unhold(KEYS[nt + np + nb + i], KEYS[nt + np + nb + nh + i], slot)
end
if delta ~= 0 then
  for i = 1, nt do
    if redis.call('exists', KEYS[i]) == 1 then
      if redis.call('incrby', KEYS[i], delta) < 0 then
        redis.call('set', KEYS[i], 0, 'KEEPTTL')
      end
    end
  end
end
for i = 1, np do
  redis.call('zrem', KEYS[nt + i], slot)
end
if cost > 0 then
  for i = 1, nb do
    local key = KEYS[nt + np + i]
    redis.call('incrbyfloat', key, ARGV[3])
    redis.call('expire', key, tonumber(ARGV[7 + i]))
  end
end
return 1
"""
)


# KEYS: parallel keys (np), budget holds (nh hashes, then their nh sorted sets).
# ARGV: slot id, np, nh. Frees a concurrency slot and ends the budget holds (idempotent: safe
# to repeat).
RELEASE_LUA = (
    _UNHOLD_LUA
    + """
local np, nh = tonumber(ARGV[2]), tonumber(ARGV[3])
for i = 1, np do
  redis.call('zrem', KEYS[i], ARGV[1])
end
for i = 1, nh do
  unhold(KEYS[np + i], KEYS[np + nh + i], ARGV[1])
end
return 1
"""
)


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
