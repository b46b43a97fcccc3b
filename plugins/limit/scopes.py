"""Which rules apply to a request, and the store keys they count under.

Counters are facts about a scope (requests in the last minute, tokens, requests in flight,
dollars spent), so rules that share a scope share its counters: two ``scope: user`` rules with
different ``tpm`` both read the same token counter. The one exception is the request window,
whose layout (the ``limits`` library's moving window: a list trimmed to the limit) depends on the
limit itself, so its key carries the limit the way ``limits.RateLimitItem.key_for`` names it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from limits import RateLimitItemPerMinute

if TYPE_CHECKING:
    from gateway.context import RequestContext

    from .config import LimitConfig, RuleConfig

#: Tier of callers without an identity (no auth plugin before ``limit``).
ANONYMOUS_TIER = "anonymous"

#: A prompt whose byte count is at most this share of the smallest tokens-per-minute limit
#: reserves its byte count instead of being tokenized: at most 1% of the limit over-reserved
#: per request in flight, until its answer settles the reservation.
BOUND_SHARE = 0.01


def _escape(value: str) -> str:
    # Values come from identities and requests; keep "/" meaning "separator" in keys.
    return value.replace("%", "%25").replace("/", "%2F")


@dataclass(slots=True)
class Check:
    """One limit of one rule, bound to this request's scope value."""

    kind: str  # "rpm" | "tpm" | "parallel" | "budget_day" | "budget_month"
    scope: str  # the rule's scope name, for messages and metrics (never the value)
    key: str  # store key (without the store's prefix)
    limit: float


@dataclass(slots=True)
class Plan:
    """The deduplicated checks of one request, grouped by kind (never modified once built, but
    for the ``memo`` a store may fill)."""

    rpm: list[Check] = field(default_factory=list)
    tpm: list[Check] = field(default_factory=list)
    parallel: list[Check] = field(default_factory=list)
    budget: list[Check] = field(default_factory=list)
    #: No check at all (an attribute rather than ``__bool__``: read on every request).
    empty: bool = field(init=False)
    #: The smallest tokens-per-minute limit (0 without one).
    tpm_min: float = field(init=False)
    #: A prompt whose byte count is at most this reserves it untokenized (see BOUND_SHARE).
    tpm_bound: float = field(init=False)
    #: What a store derives from the plan and keeps with it (the memory store: its keys).
    memo: Any = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.empty = not (self.rpm or self.tpm or self.parallel or self.budget)
        self.tpm_min = min([c.limit for c in self.tpm], default=0.0)
        self.tpm_bound = self.tpm_min * BOUND_SHARE

    def __bool__(self) -> bool:
        return not self.empty


def scope_value(rule: RuleConfig, ctx: RequestContext) -> str:
    """The identity a rule counts under, e.g. ``user/alice``; anonymous callers by client IP."""
    ident = ctx.identity
    if rule.scope == "global":
        base = "global"
    elif rule.scope == "model":
        name = ctx.model_entry.name if ctx.model_entry is not None else ctx.model
        base = f"model/{_escape(name)}"
    elif ident is None:
        # No auth plugin ran before us: every client IP is its own user, key and tenant.
        base = f"{rule.scope}/ip:{_escape(ctx.client or 'unknown')}"
    elif rule.scope == "user":
        base = f"user/{_escape(ident.user)}"
    elif rule.scope == "tenant":
        base = f"tenant/{_escape(ident.tenant)}"
    else:  # key
        base = f"key/{_escape(ident.credential_id or 'user:' + ident.user)}"
    if rule.model is not None and rule.scope != "model":
        base += f"/model/{_escape(rule.model)}"
    return base


def applies(rule: RuleConfig, ctx: RequestContext) -> bool:
    if rule.tier is not None:
        tier = ctx.identity.tier if ctx.identity is not None else ANONYMOUS_TIER
        if tier != rule.tier:
            return False
    if rule.model is not None:
        name = ctx.model_entry.name if ctx.model_entry is not None else ctx.model
        if rule.model not in (name, ctx.model):
            return False
    return True


def plan(config: LimitConfig, ctx: RequestContext) -> Plan:
    rpm: list[Check] = []
    tpm: list[Check] = []
    parallel: list[Check] = []
    budget: list[Check] = []
    seen: set[tuple[str, str, float]] = set()

    def add(bucket: list[Check], check: Check) -> None:
        ident = (check.kind, check.key, check.limit)
        if ident not in seen:
            seen.add(ident)
            bucket.append(check)

    for rule in config.rules:
        if not applies(rule, ctx):
            continue
        value = scope_value(rule, ctx)
        if rule.rpm is not None:
            item = RateLimitItemPerMinute(rule.rpm, namespace="rpm")
            add(rpm, Check("rpm", rule.scope, item.key_for(value), rule.rpm))
        if rule.tpm is not None:
            add(tpm, Check("tpm", rule.scope, f"tpm/{value}", rule.tpm))
        if rule.max_parallel is not None:
            add(parallel, Check("parallel", rule.scope, f"par/{value}", rule.max_parallel))
        if rule.budget_usd is not None:
            usd = rule.budget_usd
            if usd.day is not None:
                add(budget, Check("budget_day", rule.scope, f"usd/{value}", usd.day))
            if usd.month is not None:
                add(budget, Check("budget_month", rule.scope, f"usd/{value}", usd.month))
    return Plan(rpm, tpm, parallel, budget)
