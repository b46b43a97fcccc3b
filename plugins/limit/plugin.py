"""``limit``: requests, tokens, concurrency and dollars per identity, exact across replicas.

Admission (``on_request``) is one atomic store operation over every rule that applies: it checks
all of them and, only if all pass, counts the request, reserves its tokens (prompt + the
completion cap) and takes a concurrency slot. ``on_response`` (called by the core on success,
error and client disconnect alike) gives back the unused tokens, frees the slot and records the
spend.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, ClassVar

from prometheus_client import Counter

from gateway.errors import QuotaExceededError, RateLimitError, ServiceUnavailableError
from gateway.plugin import Plugin
from gateway.tokens import prompt_tokens, prompt_tokens_bound

from . import scopes
from .config import LimitConfig
from .headers import (
    LIMIT_REQUESTS,
    LIMIT_TOKENS,
    add_rate_limit_headers,
    format_duration,
    retry_after_headers,
)
from .prices import HoldPrices
from .retry import SettlementQueue
from .store_base import Decision, Reservation, Store, period_end
from .store_memory import MemoryStore
from .store_redis import RedisStore, StoreUnavailable

if TYPE_CHECKING:
    from gateway.context import RequestContext
    from gateway.state import Gateway

log = logging.getLogger("gateway.limit")

STORE_ERRORS = Counter(
    "gateway_limit_store_errors_total",
    "Limit operations that could not use the shared store (Redis down or slow), by operation.",
    ["op"],
)
REJECTIONS = Counter(
    "gateway_limit_rejections_total",
    "Requests refused by the limit plugin, by limit kind and rule scope.",
    ["kind", "scope"],
)


#: Distinct (caller, model) plans kept; past this the cache starts again (callers come from
#: keys, JWT claims or client addresses, so the number is not bounded by configuration).
_MAX_PLANS = 4096

_KIND_TEXT = {
    "rpm": "requests per minute (RPM)",
    "tpm": "tokens per minute (TPM)",
    "parallel": "requests in flight",
}


class LimitPlugin(Plugin):
    name = "limit"
    Config = LimitConfig
    endpoints: ClassVar[frozenset[str]] = frozenset({"chat", "embeddings"})
    config: LimitConfig

    def __init__(self, config: LimitConfig, *, clock: Callable[[], float] = time.time) -> None:
        super().__init__(config)
        #: Wall-clock seconds (UTC epoch); injectable so tests can cross minutes and days.
        self.clock = clock
        self.store: Store = MemoryStore()
        self._plans: dict[tuple[object, ...], scopes.Plan] = {}
        #: (identity, model entry, model name, plan) of the last request with an identity.
        self._last_plan: tuple[object, object, str, scopes.Plan] = (None, None, "", scopes.Plan())
        # Read on every request: plain attributes (a pydantic attribute read costs ~450
        # instructions, a class attribute's through the instance ~200).
        self._default_max_tokens = config.default_max_tokens
        self._scratch_key = self.name
        self._slot_ttl = config.parallel_slot_ttl_s
        self._new_slot_ids()
        #: Settlements the store did not take (Redis down), retried in the background.
        self.retries = SettlementQueue(self)
        #: What budget holds price a request at (the catalogue and routing rules: startup).
        self.prices = HoldPrices()

    def _new_slot_ids(self) -> None:
        """Concurrency slot ids: ``<request id>.<process prefix><counter>``. The request id may
        come from the client, so the prefix (random, drawn again in every worker's ``startup``)
        and the counter keep ids unique across requests, workers and replicas."""
        self._slot_prefix = secrets.token_hex(4)
        self._slot_counter = itertools.count()

    async def startup(self, gateway: Gateway | None = None) -> None:
        cfg = self.config
        self._new_slot_ids()
        if gateway is not None:
            route = gateway.pipeline.find("route")
            rules = getattr(getattr(route, "config", None), "rules", None) or ()
            self.prices = HoldPrices(gateway.catalogue, rules)
        if cfg.store == "memory":
            self.store = MemoryStore()
            return
        store = RedisStore(
            cfg.store,
            prefix=cfg.key_prefix,
            socket_timeout=cfg.socket_timeout_s,
            retry_after=cfg.retry_store_after_s,
        )
        self.store = store
        try:
            await store.ping()
        except StoreUnavailable as e:
            # Not fatal: the gateway starts and applies on_store_error until Redis answers.
            log.warning(
                "limit store unreachable at startup",
                extra={"error": str(e), "on_store_error": cfg.on_store_error},
            )

    async def shutdown(self) -> None:
        await self.retries.close()
        await self.store.close()

    def reservation(self, ctx: RequestContext, plan: scopes.Plan) -> tuple[int, float]:
        """What admitting the request under ``plan`` reserves: its tokens (the prompt plus the
        most the answer may use; 0 without a tokens check) and dollars (the answer's worst-case
        cost, held against the budgets until its real cost is known so that a burst cannot
        spend a budget many times over; 0 without a budget).

        The answer may use ``max_completion_tokens`` / ``max_tokens`` (else
        ``default_max_tokens``) times ``n``, none for embeddings. A prompt not counted yet
        reserves its byte count (an upper bound of its tokens) untokenized when that is at most
        ``plan.tpm_bound`` and fits the tokens limits (its answer settles the reservation to
        the upstream's usage anyway); a budget alone needs only the bound. The worst case is at
        the highest prices of the deployments that may serve it (``HoldPrices.may_serve``)."""
        if not (plan.tpm or plan.budget):
            return 0, 0.0
        cap = 0
        if ctx.endpoint != "embeddings":
            body = ctx.body
            # type() rather than isinstance: bool is an int subclass, and JSON gives no other.
            asked = body.get("max_completion_tokens")
            if type(asked) is not int or asked <= 0:
                asked = body.get("max_tokens")
                if type(asked) is not int or asked <= 0:
                    asked = self._default_max_tokens
            n = body.get("n")
            cap = asked * n if type(n) is int and n > 0 else asked
        tokens = 0
        if plan.tpm:
            prompt = ctx.prompt_tokens_estimate
            if prompt is None:
                prompt = prompt_tokens_bound(ctx)
                if prompt > plan.tpm_bound or prompt + cap > plan.tpm_min:
                    prompt = prompt_tokens(ctx)  # exact, before refusing it as too large
            tokens = prompt + cap
        else:
            prompt = prompt_tokens_bound(ctx)
        entry = ctx.model_entry
        if plan.budget and entry is not None:
            return tokens, self.prices.worst_cost(entry, prompt, cap)
        return tokens, 0.0

    def plan(self, ctx: RequestContext) -> scopes.Plan:
        """The checks of this request: a function of the caller and the model only, so built
        once per (identity, model) and reused (plans are never modified). The last plan is
        checked first, by object: identities and model entries are frozen, and an API key's
        identity is one object for all of its requests."""
        ident = ctx.identity
        entry = ctx.model_entry
        last = self._last_plan
        if ident is last[0] and entry is last[1] and ctx.model == last[2] and ident is not None:
            return last[3]
        key = (
            (ident.user, ident.tenant, ident.tier, ident.credential_id) if ident else ctx.client,
            entry.name if entry is not None else None,
            ctx.model,
        )
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) >= _MAX_PLANS:
                self._plans.clear()
            plan = self._plans[key] = scopes.plan(self.config, ctx)
        self._last_plan = (ident, entry, ctx.model, plan)
        return plan

    async def on_request(self, ctx: RequestContext) -> None:
        plan = self.plan(ctx)
        if plan.empty:
            return None
        tokens, reserve_usd = self.reservation(ctx, plan)
        if tokens > plan.tpm_min:  # (0 without tpm checks)
            for c in plan.tpm:
                if tokens > c.limit:
                    # Waiting would not help, so no Retry-After (OpenAI answers the same way).
                    REJECTIONS.labels("tpm", c.scope).inc()
                    ctx.log["limit"] = {"rejected": "tpm", "scope": c.scope, "reason": "too_large"}
                    await self._state_headers(ctx, plan)
                    raise RateLimitError(
                        f"Request too large for tokens per minute (TPM) on scope {c.scope}: "
                        f"limit {int(c.limit)}, requested {tokens}. Shorten the prompt or lower "
                        "max_tokens."
                    )
        slot_id = f"{ctx.request_id}.{self._slot_prefix}{next(self._slot_counter):x}"
        memory = self.store
        if type(memory) is MemoryStore:
            # Never suspends (so admission stays atomic) and never fails: no coroutine needed.
            taken: Reservation | Decision | None = memory.admit_now(
                plan, self.clock(), slot_id, tokens, self._slot_ttl, reserve_usd,
                ctx.response_headers,
            )  # fmt: skip
        else:
            taken = await self._admit_shared(ctx, plan, slot_id, tokens, reserve_usd)
            if taken is None:  # the store did not answer, and the request goes on
                return None
        if isinstance(taken, Decision):  # refused
            add_rate_limit_headers(ctx.response_headers, taken.requests, taken.tokens)
            denied = taken.denied
            assert denied is not None
            ctx.log["limit"] = {"rejected": denied.kind, "scope": denied.scope,
                                "retry_after_s": round(taken.retry_after or 0.0, 3)}  # fmt: skip
            raise self._denial(taken)
        scratch = ctx.scratch.get(self._scratch_key)
        if scratch is None:
            ctx.scratch[self._scratch_key] = {"reservation": taken}
        else:
            scratch["reservation"] = taken
        ctx.log["limit"] = {"reserved_tokens": tokens} if plan.tpm else "admitted"
        return None

    async def _admit_shared(
        self, ctx: RequestContext, plan: scopes.Plan, slot_id: str, tokens: int,
        reserve_usd: float,
    ) -> Reservation | Decision | None:  # fmt: skip
        """Admission by the shared store: the reservation (its headers written), the refusal,
        or None when the store did not answer and ``fail_open`` lets the request go on."""
        now = self.clock()
        try:
            decision = await self.store.admit(
                plan,
                now=now,
                slot_id=slot_id,
                tokens=tokens,
                slot_ttl=self._slot_ttl,
                reserve_usd=reserve_usd,
            )
        except StoreUnavailable as e:
            self._store_error("admit", e)
            ctx.log["limit"] = "store_unavailable"
            self._admit_failed(ctx, plan, now, slot_id, tokens, reserve_usd, e.sent)
            if self.config.on_store_error == "fail_closed":
                raise ServiceUnavailableError(
                    "Rate limiting is temporarily unavailable; please retry shortly.",
                    headers={"retry-after": "1"},
                ) from None
            return None
        if not decision.admitted:
            return decision
        add_rate_limit_headers(ctx.response_headers, decision.requests, decision.tokens)
        assert decision.reservation is not None
        return decision.reservation

    def _admit_failed(
        self, ctx: RequestContext, plan: scopes.Plan, now: float, slot_id: str, tokens: int,
        reserve_usd: float, sent: bool,
    ) -> None:  # fmt: skip
        """An admission the store did not answer. If it may have reached Redis (a timeout),
        Redis may still run it when it wakes, taking a concurrency slot and a budget hold that
        nothing would give back for ``parallel_slot_ttl_s``: queue their release (which also
        stops Redis from running the admission if it has not yet). A request admitted anyway
        (``fail_open``) gets a reservation that holds nothing, so that its spend (and, when the
        admission surely did not run, its tokens) is still recorded when it ends."""
        store = self.store
        if not isinstance(store, RedisStore):
            return
        if sent:
            taken = store.reservation(
                plan, now=now, slot_id=slot_id, tokens=tokens, reserve_usd=reserve_usd
            )
            self.retries.defer(taken, now, 0, 0.0, "abandon")
        if self.config.on_store_error == "fail_open" and (plan.budget or plan.tpm):
            res = store.reservation(plan, now=now, slot_id=slot_id, tokens=0)
            res.parallel_keys = []
            if sent:  # if the admission ran, its reserved tokens stay counted: not twice
                res.tpm_keys = []
            if res.budget or res.tpm_keys:
                scratch = ctx.scratch.get(self._scratch_key)
                if scratch is None:
                    ctx.scratch[self._scratch_key] = {"reservation": res}
                else:
                    scratch["reservation"] = res

    async def _state_headers(self, ctx: RequestContext, plan: scopes.Plan) -> None:
        """The ``x-ratelimit-*`` headers of a refusal decided without an admission (a request
        larger than a token limit): the limits' state from the store, or, when the store cannot
        be read, the limits alone."""
        store = self.store
        now = self.clock()
        try:
            state = store.peek_now(plan, now) if type(store) is MemoryStore else (
                await store.peek(plan, now=now))  # fmt: skip
        except StoreUnavailable as e:
            self._store_error("peek", e)
            out = ctx.response_headers
            if plan.rpm:
                out[LIMIT_REQUESTS] = str(int(min(c.limit for c in plan.rpm)))
            if plan.tpm:
                out[LIMIT_TOKENS] = str(int(min(c.limit for c in plan.tpm)))
            return
        add_rate_limit_headers(ctx.response_headers, state.requests, state.tokens)

    async def on_response(self, ctx: RequestContext) -> None:
        scratch = ctx.scratch.get(self._scratch_key)
        res: Reservation | None = scratch.pop("reservation", None) if scratch else None
        if res is None:  # refused, failed open, or no rule applied
            return
        usage = ctx.usage
        # usage.total_tokens, without the property call
        used = usage.prompt_tokens + usage.completion_tokens if usage is not None else 0
        cost = 0.0
        if usage is not None and res.budget:
            dep = ctx.deployment
            if dep is None and ctx.model_entry is not None:
                dep = ctx.model_entry.deployments[0]
            if dep is not None:
                cost = self.prices.cost(dep, usage)
        memory = self.store
        if type(memory) is MemoryStore:
            # Never suspends, so no cancellation can interrupt it: no task for a shield.
            memory.settle_now(res, self.clock(), used, cost)
            return
        now = self.clock()
        settle = self.store.settle(res, now=now, used_tokens=used, cost_usd=cost)
        try:
            # Shielded: a disconnect that cancels this task must still free the slot.
            await asyncio.shield(settle)
        except StoreUnavailable as e:
            self._store_error("settle", e)
            self.retries.defer(res, now, used, cost, "release" if e.sent else "settle")

    def _denial(self, decision: Decision) -> RateLimitError:
        c = decision.denied
        assert c is not None
        retry = decision.retry_after or 0.0
        REJECTIONS.labels(c.kind, c.scope).inc()
        headers = retry_after_headers(retry)
        if c.kind == "budget_held":
            return RateLimitError(
                f"The budget on scope {c.scope} (limit ${c.limit:.2f}) is held by requests in "
                f"flight until their cost is known. Please try again in {format_duration(retry)}.",
                headers=headers,
            )
        if c.kind in ("budget_day", "budget_month"):
            period = "daily" if c.kind == "budget_day" else "monthly"
            resets = datetime.fromtimestamp(period_end(c, self.clock()), UTC)
            return QuotaExceededError(
                f"You exceeded your {period} budget on scope {c.scope} "
                f"(limit ${c.limit:.2f}); it resets at {resets:%Y-%m-%dT%H:%M:%SZ}.",
                headers=headers,
            )
        return RateLimitError(
            f"Rate limit reached for {_KIND_TEXT[c.kind]} on scope {c.scope}: limit "
            f"{int(c.limit)}. Please try again in {format_duration(retry)}.",
            headers=headers,
        )

    def _store_error(self, op: str, err: Exception) -> None:
        STORE_ERRORS.labels(op).inc()
        log.warning(
            "limit store unavailable",
            extra={"op": op, "error": str(err), "on_store_error": self.config.on_store_error},
        )
