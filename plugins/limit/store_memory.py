"""The in-process store: exact for one process, nothing shared between replicas.

Every method runs without awaiting anything, so under asyncio one admission is atomic: no other
request can run between its checks and its commits.
"""

from __future__ import annotations

from collections import deque
from math import floor

from .scopes import Check, Plan
from .store_base import (
    HELD_RETRY_S,
    WINDOW,
    Decision,
    Reservation,
    held_check,
    period,
    period_of,
    tpm_retry_after,
    tpm_usage,
    window_index,
)
from .store_base import Usage as LimitUsage

#: Retry-After for a full concurrency limit: slots free when requests end, which we can't know.
PARALLEL_RETRY_S = 1.0


class MemoryStore:
    def __init__(self) -> None:
        self._rpm: dict[str, deque[float]] = {}
        self._tpm: dict[str, list[float]] = {}  # key/minute -> [minute index, tokens]
        self._par: dict[str, dict[str, float]] = {}  # key -> slot id -> expiry
        self._usd: dict[str, list[float]] = {}  # period key -> [period end, spent, held]
        self._next_sweep = 0.0
        self._minute: tuple[int | None, str, str] = (None, "", "")

    async def admit(
        self, plan: Plan, *, now: float, slot_id: str, tokens: int, slot_ttl: float,
        reserve_usd: float = 0.0,
    ) -> Decision:  # fmt: skip
        return self.admit_now(plan, now, slot_id, tokens, slot_ttl, reserve_usd)

    async def settle(
        self, res: Reservation, *, now: float, used_tokens: int, cost_usd: float
    ) -> None:
        self.settle_now(res, now, used_tokens, cost_usd)

    async def close(self) -> None:
        return None

    # The synchronous forms: what ``admit`` and ``settle`` do, for callers that know they hold a
    # memory store (the plugin calls these directly, saving a coroutine per call).

    def admit_now(
        self, plan: Plan, now: float, slot_id: str, tokens: int, slot_ttl: float,
        reserve_usd: float = 0.0,
    ) -> Decision:  # fmt: skip
        # Runs on every request: the arithmetic of store_base's helpers is spelt out here
        # (tpm_used, tpm_usage, window_index), and positional constructors are used.
        if now >= self._next_sweep:
            self._sweep(now)
        # Checks first, all of them, so a refused request consumes nothing.
        rpm = self._rpm
        if plan.rpm:
            cutoff = now - WINDOW
            for c in plan.rpm:
                dq = rpm.get(c.key)
                if dq is not None:
                    while dq and dq[0] <= cutoff:
                        dq.popleft()
                    if len(dq) >= c.limit:
                        return self._refusal(plan, now, tokens)
        tpm_state: list[tuple[Check, str, float, float]] = []
        if plan.tpm:
            w = floor(now / WINDOW)  # window_index(now)
            minute = self._minute
            if minute[0] != w:
                # The counter key suffixes of this minute and the one before, formatted once a
                # minute, not per request.
                minute = self._minute = (w, f"/{w}", f"/{w - 1}")
            elapsed = now - w * WINDOW
            cur_suffix, prev_suffix = minute[1], minute[2]
            tpm = self._tpm
            for c in plan.tpm:
                key = c.key + cur_suffix
                entry = tpm.get(key)
                cur = entry[1] if entry is not None else 0.0
                entry = tpm.get(c.key + prev_suffix)
                prev = entry[1] if entry is not None else 0.0
                if prev * (WINDOW - elapsed) / WINDOW + cur + tokens > c.limit:  # tpm_used
                    return self._refusal(plan, now, tokens)
                tpm_state.append((c, key, prev, cur))
        for c in plan.parallel:
            slots = self._par.get(c.key)
            # Expired slots only matter when they would make the count reach the limit.
            if slots and len(slots) >= c.limit:
                for sid in [s for s, exp in slots.items() if exp <= now]:
                    del slots[sid]
                if len(slots) >= c.limit:
                    return self._refusal(plan, now, tokens)
        budget_state: list[tuple[str, float]] = []
        for c in plan.budget:
            _, period_ends, suffix = period(c.kind, now)
            pkey = c.key + suffix
            entry = self._usd.get(pkey)
            if entry is not None and entry[1] + entry[2] >= c.limit:  # spent, or held
                return self._refusal(plan, now, tokens)
            budget_state.append((pkey, period_ends))

        # Commit.
        requests: list[LimitUsage] = []
        for c in plan.rpm:
            dq = rpm.get(c.key)
            if dq is None:
                dq = rpm[c.key] = deque(maxlen=int(c.limit))
            dq.append(now)
            requests.append(LimitUsage(c.limit, c.limit - len(dq), dq[0] + WINDOW - now))
        token_usage: list[LimitUsage] = []
        tpm_keys: list[str] = []
        if tpm_state:
            tpm = self._tpm
            for c, key, prev, cur in tpm_state:
                if key not in tpm_keys:  # rules sharing a scope share its counter
                    tpm_keys.append(key)
                    entry = tpm.get(key)
                    if entry is None:
                        tpm[key] = [w, tokens]
                    else:
                        entry[1] += tokens
                # tpm_usage(prev, cur + tokens, elapsed, c.limit), spelt out.
                cur += tokens
                if cur > 0:
                    reset = 2 * WINDOW - elapsed
                else:
                    reset = WINDOW - elapsed if prev > 0 else 0.0
                left = floor(c.limit - (prev * (WINDOW - elapsed) / WINDOW + cur))
                token_usage.append(LimitUsage(c.limit, left if left > 0 else 0.0, reset))
        parallel_keys: list[str] = []
        if plan.parallel:
            expiry = now + slot_ttl
            par = self._par
            for c in plan.parallel:
                slots = par.get(c.key)
                if slots is None:
                    par[c.key] = {slot_id: expiry}
                else:
                    slots[slot_id] = expiry
                if c.key not in parallel_keys:
                    parallel_keys.append(c.key)
        res = Reservation(slot_id, tokens, tpm_keys, parallel_keys, plan.budget)
        if reserve_usd > 0 and budget_state:
            res.reserved_usd = reserve_usd
            budget_keys = res.budget_keys
            usd = self._usd
            for pkey, end in budget_state:
                if pkey in budget_keys:  # rules sharing a scope share its period counter
                    continue
                budget_keys.append(pkey)
                entry = usd.get(pkey)
                if entry is None:
                    usd[pkey] = [end, 0.0, reserve_usd]
                else:
                    entry[2] += reserve_usd
        return Decision(True, None, None, requests, token_usage, res)

    def _refusal(self, plan: Plan, now: float, tokens: int) -> Decision:
        """A refusal (some check failed): every check is evaluated again, and the one with the
        longest wait (the first of equals) is the one named, so that a client that waits as
        long as Retry-After says does not run into another limit. (Off the hot path: only
        refusals come here.)"""
        denied: Check | None = None
        retry = -1.0

        def failed(c: Check, wait: float) -> None:
            nonlocal denied, retry
            if wait > retry:
                denied, retry = c, wait

        cutoff = now - WINDOW
        for c in plan.rpm:
            dq = self._rpm.get(c.key)
            if dq is not None:
                live = [t for t in dq if t > cutoff]
                if len(live) >= c.limit:
                    failed(c, live[-int(c.limit)] + WINDOW - now)
        if plan.tpm:
            w = floor(now / WINDOW)
            elapsed = now - w * WINDOW
            for c in plan.tpm:
                entry = self._tpm.get(f"{c.key}/{w}")
                cur = entry[1] if entry is not None else 0.0
                entry = self._tpm.get(f"{c.key}/{w - 1}")
                prev = entry[1] if entry is not None else 0.0
                if prev * (WINDOW - elapsed) / WINDOW + cur + tokens > c.limit:
                    failed(c, tpm_retry_after(prev, cur, elapsed, c.limit, tokens))
        for c in plan.parallel:
            slots = self._par.get(c.key)
            if slots and sum(1 for exp in slots.values() if exp > now) >= c.limit:
                failed(c, PARALLEL_RETRY_S)
        for c in plan.budget:
            _, period_ends, suffix = period(c.kind, now)
            usd = self._usd.get(c.key + suffix)
            if usd is not None:
                if usd[1] >= c.limit:
                    failed(c, period_ends - now)
                elif usd[1] + usd[2] >= c.limit:  # not spent: held by requests in flight
                    failed(held_check(c), HELD_RETRY_S)
        assert denied is not None
        return self._refused(plan, now, denied, retry)

    def peek_now(self, plan: Plan, now: float) -> Decision:
        """The request and token limits' state, changing nothing that counts."""
        return self._refused(plan, now, None, None)

    async def peek(self, plan: Plan, *, now: float) -> Decision:
        return self.peek_now(plan, now)

    def _refused(
        self, plan: Plan, now: float, denied: Check | None, retry: float | None
    ) -> Decision:
        """A refusal, with the state of every request and token limit for the
        ``x-ratelimit-*`` headers (OpenAI sends them with its 429s too)."""
        requests: list[LimitUsage] = []
        cutoff = now - WINDOW
        for c in plan.rpm:
            dq = self._rpm.get(c.key)
            while dq and dq[0] <= cutoff:
                dq.popleft()
            if dq:
                left = c.limit - len(dq)
                requests.append(LimitUsage(c.limit, left if left > 0 else 0, dq[0] + WINDOW - now))
            else:
                requests.append(LimitUsage(c.limit, c.limit, 0.0))
        tokens: list[LimitUsage] = []
        if plan.tpm:
            w = floor(now / WINDOW)
            elapsed = now - w * WINDOW
            for c in plan.tpm:
                cur = self._tpm.get(f"{c.key}/{w}")
                prev = self._tpm.get(f"{c.key}/{w - 1}")
                tokens.append(
                    tpm_usage(prev[1] if prev else 0.0, cur[1] if cur else 0.0, elapsed, c.limit)
                )
        return Decision(False, denied, retry, requests, tokens)

    def settle_now(self, res: Reservation, now: float, used_tokens: int, cost_usd: float) -> None:
        delta = used_tokens - res.tokens
        if delta:
            for key in res.tpm_keys:
                entry = self._tpm.get(key)
                if entry is not None:  # gone: its minute left the window already
                    entry[1] = max(0.0, entry[1] + delta)
        for key in res.parallel_keys:
            slots = self._par.get(key)
            if slots is not None:
                slots.pop(res.slot_id, None)
        for pkey in res.budget_keys:  # the hold ends: the real cost replaces it
            entry = self._usd.get(pkey)
            if entry is not None:
                held = entry[2] - res.reserved_usd
                entry[2] = held if held > 1e-12 else 0.0
        budget = res.budget
        if cost_usd > 0 and budget:
            # Rules sharing a scope share its period counter: count the spend once.
            periods = (
                [period_of(budget[0], now)]
                if len(budget) == 1
                else dict(period_of(c, now) for c in budget).items()
            )
            for pkey, end in periods:
                entry = self._usd.get(pkey)
                if entry is None:
                    self._usd[pkey] = [end, cost_usd, 0.0]
                else:
                    entry[1] += cost_usd

    def _sweep(self, now: float) -> None:
        """Drop counters that can no longer matter, so memory follows active callers only."""
        self._next_sweep = now + WINDOW
        cutoff = now - WINDOW
        for key in [k for k, dq in self._rpm.items() if not dq or dq[-1] <= cutoff]:
            del self._rpm[key]
        w = window_index(now)
        for key in [k for k, e in self._tpm.items() if e[0] < w - 1]:
            del self._tpm[key]
        for key, slots in list(self._par.items()):
            for sid in [s for s, exp in slots.items() if exp <= now]:
                del slots[sid]
            if not slots:
                del self._par[key]
        for key in [k for k, e in self._usd.items() if e[0] <= now]:
            del self._usd[key]
