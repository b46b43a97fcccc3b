"""The in-process store: exact for one process, nothing shared between replicas.

Every method runs without awaiting anything, so under asyncio one admission is atomic: no other
request can run between its checks and its commits.
"""

from __future__ import annotations

from collections import deque

from .scopes import Check, Plan
from .store_base import (
    WINDOW,
    Decision,
    Reservation,
    period_end,
    period_key,
    period_of,
    tpm_retry_after,
    tpm_usage,
    tpm_used,
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
        self._usd: dict[str, list[float]] = {}  # period key -> [period end, spent]
        self._next_sweep = 0.0

    async def admit(
        self, plan: Plan, *, now: float, slot_id: str, tokens: int, slot_ttl: float
    ) -> Decision:
        if now >= self._next_sweep:
            self._sweep(now)
        cutoff = now - WINDOW
        # Checks first, all of them, so a refused request consumes nothing.
        for c in plan.rpm:
            dq = self._rpm.get(c.key)
            if dq is not None:
                while dq and dq[0] <= cutoff:
                    dq.popleft()
                if len(dq) >= c.limit:
                    retry = dq[-int(c.limit)] + WINDOW - now
                    return Decision(False, c, retry, requests=[LimitUsage(c.limit, 0, retry)])
        w = window_index(now)
        elapsed = now - w * WINDOW
        tpm_state: list[tuple[Check, str, float, float]] = []
        for c in plan.tpm:
            key = f"{c.key}/{w}"
            prev = self._tokens(f"{c.key}/{w - 1}")
            cur = self._tokens(key)
            if tpm_used(prev, cur, elapsed) + tokens > c.limit:
                retry = tpm_retry_after(prev, cur, elapsed, c.limit, tokens)
                return Decision(False, c, retry, tokens=[tpm_usage(prev, cur, elapsed, c.limit)])
            tpm_state.append((c, key, prev, cur))
        for c in plan.parallel:
            slots = self._par.get(c.key)
            # Expired slots only matter when they would make the count reach the limit.
            if slots and len(slots) >= c.limit:
                for sid in [s for s, exp in slots.items() if exp <= now]:
                    del slots[sid]
                if len(slots) >= c.limit:
                    return Decision(False, c, PARALLEL_RETRY_S)
        for c in plan.budget:
            entry = self._usd.get(period_key(c, now))
            if entry is not None and entry[1] >= c.limit:
                return Decision(False, c, period_end(c, now) - now)

        # Commit. (Positional constructors: this runs on every request.)
        requests: list[LimitUsage] = []
        for c in plan.rpm:
            dq = self._rpm.get(c.key)
            if dq is None:
                dq = self._rpm[c.key] = deque(maxlen=int(c.limit))
            dq.append(now)
            requests.append(LimitUsage(c.limit, c.limit - len(dq), dq[0] + WINDOW - now))
        token_usage: list[LimitUsage] = []
        tpm_keys: list[str] = []
        for c, key, prev, cur in tpm_state:
            if key not in tpm_keys:  # rules sharing a scope share its counter
                tpm_keys.append(key)
                self._tpm.setdefault(key, [w, 0])[1] += tokens
            token_usage.append(tpm_usage(prev, cur + tokens, elapsed, c.limit))
        parallel_keys: list[str] = []
        for c in plan.parallel:
            self._par.setdefault(c.key, {})[slot_id] = now + slot_ttl
            if c.key not in parallel_keys:
                parallel_keys.append(c.key)
        res = Reservation(slot_id, tokens, tpm_keys, parallel_keys, plan.budget)
        return Decision(True, None, None, requests, token_usage, res)

    async def settle(
        self, res: Reservation, *, now: float, used_tokens: int, cost_usd: float
    ) -> None:
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
        if cost_usd > 0:
            # Rules sharing a scope share its period counter: count the spend once.
            for pkey, end in dict(period_of(c, now) for c in res.budget).items():
                self._usd.setdefault(pkey, [end, 0.0])[1] += cost_usd

    async def close(self) -> None:
        return None

    def _tokens(self, key: str) -> float:
        entry = self._tpm.get(key)
        return entry[1] if entry is not None else 0.0

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
