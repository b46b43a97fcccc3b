"""The in-process store: exact for one process, nothing shared between replicas.

Every method runs without awaiting anything, so under asyncio one admission is atomic: no other
request can run between its checks and its commits.
"""

from __future__ import annotations

from collections import deque
from math import floor

from .headers import State, tighter, write_rate_limit_headers
from .scopes import Check, Plan
from .store_base import (
    HELD_RETRY_S,
    WINDOW,
    Decision,
    Reservation,
    held_check,
    period,
    tpm_retry_after,
    tpm_usage,
    window_index,
)
from .store_base import Usage as LimitUsage

#: Retry-After for a full concurrency limit: slots free when requests end, which we can't know.
PARALLEL_RETRY_S = 1.0


class _Keys:
    """The counter keys a plan's admissions use, formatted and deduplicated once per plan and
    minute (tokens) or budget period instead of on every request (kept as the plan's ``memo``).
    Rules sharing a scope share its counters, so ``tpm_keys``, ``parallel_keys`` and
    ``budget_keys`` name each counter once, in the order of the plan's checks. Reservations
    share these lists: they are replaced, never modified."""

    __slots__ = (
        "budget", "budget_checks", "budget_keys", "budget_periods", "minute", "parallel_keys",
        "period_end", "period_start", "tpm", "tpm_checks", "tpm_keys",
    )  # fmt: skip

    def __init__(self, plan: Plan) -> None:
        # The plan's lists, not the plan: it holds this object.
        self.tpm_checks, self.budget_checks = plan.tpm, plan.budget
        self.minute: int | None = None
        #: Per tokens check: (check, key of this minute, key of the one before).
        self.tpm: list[tuple[Check, str, str]] = []
        self.tpm_keys: list[str] = []
        self.parallel_keys = list(dict.fromkeys(c.key for c in plan.parallel))
        #: What the budget keys are good for: [start, end) of the shortest period.
        self.period_start = self.period_end = 0.0
        #: Per budget check: (check, period key).
        self.budget: list[tuple[Check, str]] = []
        self.budget_keys: list[str] = []
        #: (period key, period end), once per key.
        self.budget_periods: list[tuple[str, float]] = []

    def set_minute(self, w: int) -> None:
        cur, prev = f"/{w}", f"/{w - 1}"
        self.minute = w
        self.tpm = [(c, c.key + cur, c.key + prev) for c in self.tpm_checks]
        self.tpm_keys = list(dict.fromkeys(key for _, key, _ in self.tpm))

    def set_period(self, now: float) -> None:
        start, end = float("-inf"), float("inf")
        budget: list[tuple[Check, str]] = []
        periods: dict[str, float] = {}
        for c in self.budget_checks:
            first, last, suffix = period(c.kind, now)
            start, end = max(start, first), min(end, last)
            budget.append((c, c.key + suffix))
            periods.setdefault(c.key + suffix, last)
        self.period_start, self.period_end = start, end
        self.budget = budget
        self.budget_keys = list(periods)
        self.budget_periods = list(periods.items())


class _Reservation(Reservation):
    """A memory store's reservation: with its plan's keys, for the periods of the spend.
    (One per admission: built positionally, without the dataclass's checks for defaults.)"""

    __slots__ = ("keys",)

    def __init__(
        self, slot_id: str, tokens: int, tpm_keys: list[str], parallel_keys: list[str],
        budget: list[Check], reserved_usd: float, budget_keys: list[str], keys: _Keys,
    ) -> None:  # fmt: skip
        self.slot_id, self.tokens, self.tpm_keys = slot_id, tokens, tpm_keys
        self.parallel_keys, self.budget, self.reserved_usd = parallel_keys, budget, reserved_usd
        self.budget_keys, self.keys = budget_keys, keys


class MemoryStore:
    def __init__(self) -> None:
        self._rpm: dict[str, deque[float]] = {}
        self._tpm: dict[str, list[float]] = {}  # key/minute -> [minute index, tokens]
        self._par: dict[str, dict[str, float]] = {}  # key -> slot id -> expiry
        self._usd: dict[str, list[float]] = {}  # period key -> [period end, spent, held]
        self._next_sweep = 0.0

    async def admit(
        self, plan: Plan, *, now: float, slot_id: str, tokens: int, slot_ttl: float,
        reserve_usd: float = 0.0,
    ) -> Decision:  # fmt: skip
        taken = self.admit_now(plan, now, slot_id, tokens, slot_ttl, reserve_usd, {})
        if isinstance(taken, Decision):
            return taken
        state = self.peek_now(plan, now)  # the limits' state after the admission
        return Decision(True, None, None, state.requests, state.tokens, taken)

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
        reserve_usd: float, headers: dict[str, str],
    ) -> Reservation | Decision:  # fmt: skip
        """The reservation of an admission, its ``x-ratelimit-*`` headers written to ``headers``
        (straight from the counters: no Usage objects nor Decision to build and read back);
        or the refusal's Decision."""
        # Runs on every request: the arithmetic of store_base's helpers is spelt out here
        # (tpm_used, tpm_usage, window_index), positional constructors are used, and the keys
        # come formatted and deduplicated from the plan's _Keys.
        if now >= self._next_sweep:
            self._sweep(now)
        keys = plan.memo
        if keys is None:
            keys = plan.memo = _Keys(plan)
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
        token_state: State | None = None  # the tightest tokens limit once admitted
        if plan.tpm:
            w = floor(now / WINDOW)  # window_index(now)
            if keys.minute != w:
                keys.set_minute(w)
            elapsed = now - w * WINDOW
            tpm = self._tpm
            for c, key, prev_key in keys.tpm:
                entry = tpm.get(key)
                cur = entry[1] if entry is not None else 0.0
                entry = tpm.get(prev_key)
                prev = entry[1] if entry is not None else 0.0
                weighted = prev * (WINDOW - elapsed) / WINDOW
                if weighted + cur + tokens > c.limit:  # tpm_used
                    return self._refusal(plan, now, tokens)
                # Its state once admitted: tpm_usage(prev, cur + tokens, elapsed, c.limit).
                cur += tokens
                if cur > 0:
                    reset = 2 * WINDOW - elapsed
                else:
                    reset = WINDOW - elapsed if prev > 0 else 0.0
                left = floor(c.limit - (weighted + cur))
                state = (c.limit, left if left > 0 else 0, reset)
                if token_state is None or tighter(state, token_state):
                    token_state = state
        par = self._par
        for c in plan.parallel:
            slots = par.get(c.key)
            # Expired slots only matter when they would make the count reach the limit.
            if slots and len(slots) >= c.limit:
                for sid in [s for s, exp in slots.items() if exp <= now]:
                    del slots[sid]
                if len(slots) >= c.limit:
                    return self._refusal(plan, now, tokens)
        if plan.budget:
            if not keys.period_start <= now < keys.period_end:
                keys.set_period(now)
            usd = self._usd
            for c, pkey in keys.budget:
                entry = usd.get(pkey)
                if entry is not None and entry[1] + entry[2] >= c.limit:  # spent, or held
                    return self._refusal(plan, now, tokens)

        # Commit.
        requests: State | None = None
        for c in plan.rpm:
            dq = rpm.get(c.key)
            if dq is None:
                dq = rpm[c.key] = deque(maxlen=int(c.limit))
            dq.append(now)
            state = (c.limit, c.limit - len(dq), dq[0] + WINDOW - now)
            if requests is None or tighter(state, requests):
                requests = state
        if token_state is not None:
            for key in keys.tpm_keys:  # rules sharing a scope share its counter
                entry = tpm.get(key)
                if entry is None:
                    tpm[key] = [w, tokens]
                else:
                    entry[1] += tokens
        write_rate_limit_headers(headers, requests, token_state)
        if plan.parallel:
            expiry = now + slot_ttl
            for key in keys.parallel_keys:
                slots = par.get(key)
                if slots is None:
                    par[key] = {slot_id: expiry}
                else:
                    slots[slot_id] = expiry
        if reserve_usd > 0 and plan.budget:
            usd = self._usd
            for pkey, end in keys.budget_periods:  # rules sharing a scope share its counter
                entry = usd.get(pkey)
                if entry is None:
                    usd[pkey] = [end, 0.0, reserve_usd]
                else:
                    entry[2] += reserve_usd
            held = keys.budget_keys
        else:
            reserve_usd, held = 0.0, []
        return _Reservation(
            slot_id, tokens, keys.tpm_keys, keys.parallel_keys, plan.budget, reserve_usd, held,
            keys,
        )  # fmt: skip

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
            tpm = self._tpm
            for key in res.tpm_keys:
                entry = tpm.get(key)
                if entry is not None:  # gone: its minute left the window already
                    left = entry[1] + delta
                    entry[1] = left if left > 0.0 else 0.0  # max(0.0, left)
        if res.parallel_keys:
            par = self._par
            for key in res.parallel_keys:
                slots = par.get(key)
                if slots is not None:
                    slots.pop(res.slot_id, None)
        usd = self._usd
        keys = None
        if cost_usd > 0 and res.budget:
            # Rules sharing a scope share its period counter: count the spend once.
            keys = res.keys if isinstance(res, _Reservation) else None
            if keys is None:
                keys = _Keys(Plan(budget=res.budget))
            if not keys.period_start <= now < keys.period_end:
                keys.set_period(now)
            if res.budget_keys is keys.budget_keys:
                # Held in the periods of the spend (the usual case): the hold ends and the
                # real cost replaces it in one pass over the counters.
                reserved = res.reserved_usd
                for pkey, end in keys.budget_periods:
                    entry = usd.get(pkey)
                    if entry is None:
                        usd[pkey] = [end, cost_usd, 0.0]
                    else:
                        held = entry[2] - reserved
                        entry[2] = held if held > 1e-12 else 0.0
                        entry[1] += cost_usd
                return
        for pkey in res.budget_keys:  # the hold ends: the real cost replaces it
            entry = usd.get(pkey)
            if entry is not None:
                held = entry[2] - res.reserved_usd
                entry[2] = held if held > 1e-12 else 0.0
        if keys is not None:
            for pkey, end in keys.budget_periods:
                entry = usd.get(pkey)
                if entry is None:
                    usd[pkey] = [end, cost_usd, 0.0]
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
