"""The ``route`` plugin: chooses the deployment and the attempt plan for each request.

``on_request`` builds the plan: the first matching rule (or the requested model) gives the
primary deployments, filtered by what the request needs (capabilities, context window) and by
the circuit breakers, ordered by the load balancer (or by price for ``cheapest``); the model's
``fallbacks`` chain follows. The core tries the plan in order; ``on_attempt`` feeds the breakers
and the latency average, honours ``Retry-After`` and spends the retry budget.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from gateway.config import ConfigError
from gateway.errors import (
    ContextLengthError,
    GatewayError,
    InvalidRequestError,
    PermissionDeniedError,
    ServiceUnavailableError,
)
from gateway.plugin import Plugin
from plugins.route.balance import Balancer
from plugins.route.breaker import HALF_OPEN, Breakers
from plugins.route.budget import RetryBudget
from plugins.route.config import RouteConfig, Rule
from plugins.route.rules import Needs, estimated_cost, first_match, fits, needs_of

if TYPE_CHECKING:
    from gateway.catalogue import Catalogue, Deployment, ModelEntry
    from gateway.config import Settings
    from gateway.context import RequestContext
    from gateway.state import Gateway

log = logging.getLogger("gateway.route")

__all__ = ["RouteConfig", "RoutePlugin"]


class RoutePlugin(Plugin):
    name = "route"
    Config = RouteConfig
    endpoints = frozenset({"chat", "embeddings"})

    def __init__(
        self,
        config: RouteConfig,
        clock: Callable[[], float] = time.monotonic,
        seed: int | None = None,
    ) -> None:
        super().__init__(config)
        self.config: RouteConfig = config
        self.breakers = Breakers(config.breaker.failures, config.breaker.cooldown_s, clock)
        b = config.retry_budget
        self.budget = RetryBudget(b.ratio, b.floor_per_s, b.burst, clock)
        self.balancer = Balancer(config.balance, config.latency_alpha, seed)
        self.catalogue: Catalogue | None = None
        self.by_id: dict[str, Deployment] = {}
        self.owner: dict[str, ModelEntry] = {}
        #: The auth plugin's role grants, when it runs: fallbacks and rules never take a caller
        #: to a model its roles do not grant.
        self.rbac: Any = None

    async def startup(self, gateway: Gateway) -> None:
        self.bind(gateway.catalogue)
        self.rbac = getattr(gateway.pipeline.find("auth"), "rbac", None)

    def granted(self, ctx: RequestContext, entry: ModelEntry) -> bool:
        """Whether the caller's roles grant ``entry`` (the model it asked for always passes:
        auth decided on it; so does everything when no auth plugin or identity is there)."""
        if self.rbac is None or ctx.identity is None or entry is ctx.model_entry:
            return True
        return bool(self.rbac.model_allowed(ctx.identity, entry.name))

    def check(self, settings: Settings, pipeline: list[str]) -> None:
        from gateway.catalogue import Catalogue

        index = pipeline.index(self.name)
        where = f"{settings.source}: pipeline[{index}].config."
        self._check_rules(Catalogue(settings.models), where)

    def bind(self, catalogue: Catalogue) -> None:
        """Index the catalogue and check that every rule names things that exist."""
        self.catalogue = catalogue
        for entry in catalogue.entries:
            for dep in entry.deployments:
                self.by_id[dep.id] = dep
                self.owner[dep.id] = entry
                self.breakers.add(dep.id)
        self._check_rules(catalogue, "route plugin: ")

    def _check_rules(self, catalogue: Catalogue, where: str) -> None:
        """That every rule names models and deployments that exist (``where``: the messages'
        prefix, up to the rule list's own key)."""
        ids = [dep.id for dep in catalogue.deployments()]
        for i, rule in enumerate(self.config.rules):
            at = f"{where}rules[{i}]"
            for name in (*rule.when.models, *([rule.model] if rule.model else [])):
                if catalogue.get(name) is None:
                    raise ConfigError(
                        f"{at}: unknown model {name!r}; known: {', '.join(catalogue.names())}"
                    )
            for dep_id in rule.deployments:
                if dep_id not in ids:
                    raise ConfigError(
                        f"{at}.deployments: unknown deployment {dep_id!r}; known: {', '.join(ids)}"
                    )

    # ---- planning -------------------------------------------------------------------------

    def _chain(self, entry: ModelEntry) -> list[ModelEntry]:
        """The model, then its fallbacks breadth-first (fallbacks of fallbacks), no repeats."""
        assert self.catalogue is not None
        out, queue, seen = [], [entry], {entry.name}
        while queue:
            current = queue.pop(0)
            out.append(current)
            for name in current.fallbacks:
                fb = self.catalogue.get(name)
                if fb is not None and fb.name not in seen:
                    seen.add(fb.name)
                    queue.append(fb)
        return out

    def _pinned(self, ctx: RequestContext, entry: ModelEntry) -> Deployment | None:
        dep_id = ctx.headers.get(self.config.pin_header)
        if dep_id is None:
            return None
        roles = set(ctx.identity.roles) if ctx.identity else set()
        if not roles & set(self.config.pin_roles):
            raise PermissionDeniedError(
                f"pinning a deployment with {self.config.pin_header} is not allowed for this caller"
            )
        allowed = {
            d.id: d for e in self._chain(entry) if self.granted(ctx, e) for d in e.deployments
        }
        if dep_id not in allowed:
            raise InvalidRequestError(
                f"{dep_id[:100]!r} is not a deployment of model {entry.name!r}",
                param=self.config.pin_header,
            )
        return allowed[dep_id]

    def plan(self, ctx: RequestContext, entry: ModelEntry) -> tuple[list[Deployment], str]:
        """The attempt plan and the name of the rule that chose it."""
        needs = needs_of(ctx)
        idx, rule = first_match(self.config.rules, ctx, needs)
        label = (rule.name or f"rules[{idx}]") if rule is not None else "default"
        target = entry
        if rule is not None and rule.model:
            assert self.catalogue is not None
            target = self.catalogue.get(rule.model) or entry
            if not self.granted(ctx, target):
                target = entry  # the rule's model is not this caller's: its own model instead
        chain = [e for e in self._chain(target) if self.granted(ctx, e)]
        groups: list[list[Deployment]] = []
        if rule is not None and rule.deployments:
            deps = [self.by_id[i] for i in rule.deployments]
            deps = [d for d in deps if self.granted(ctx, self.owner[d.id])]
            groups.append(deps or list(target.deployments))
        else:
            groups.append(list(target.deployments))
        if rule is None or rule.fallbacks:
            groups.extend(list(e.deployments) for e in chain[1:])
        plan = self._filter(ctx, needs, groups, rule)
        return plan, label

    def _filter(
        self, ctx: RequestContext, needs: Needs, groups: list[list[Deployment]], rule: Rule | None
    ) -> list[Deployment]:
        caps = needs.capabilities()
        plan: list[Deployment] = []
        seen: set[str] = set()
        capable = fitting = 0
        blocked: list[str] = []
        for group in groups:
            usable = []
            for dep in group:
                if dep.id in seen:
                    continue
                seen.add(dep.id)
                if not caps <= set(dep.capabilities):
                    continue
                capable += 1
                if not fits(ctx, needs, dep):
                    continue
                fitting += 1
                if not self.breakers.available(dep.id):
                    blocked.append(dep.id)
                    continue
                usable.append(dep)
            if rule is not None and rule.cheapest:
                usable.sort(key=lambda d: estimated_cost(ctx, needs, d))
            else:
                usable = self.balancer.order(usable)
            plan.extend(usable)
        if plan:
            return plan
        model = ctx.model_entry.name if ctx.model_entry else ctx.model
        if blocked:
            wait = min(self.breakers.retry_in(d) for d in blocked)
            raise ServiceUnavailableError(
                f"every deployment of model {model!r} is unavailable (circuit open); retry later",
                headers={"retry-after": str(max(1, math.ceil(wait)))},
            )
        if capable:
            raise ContextLengthError(
                f"the request ({needs.output_tokens} output tokens asked) does not fit the "
                f"context window of any deployment of model {model!r}",
                param="messages",
            )
        raise InvalidRequestError(
            f"no deployment of model {model!r} supports: {', '.join(sorted(caps))}",
            param="model",
        )

    # ---- hooks ----------------------------------------------------------------------------

    async def on_request(self, ctx: RequestContext) -> None:
        entry = ctx.model_entry
        if entry is None:
            return None
        scratch = ctx.scratch_for(self.name)
        cfg = self.config  # (a stream's deadline bounds its start, a plain one's whole answer)
        ctx.deadline = time.perf_counter() + (
            cfg.deadline_s if ctx.stream else cfg.plain_deadline_s
        )
        self.budget.deposit()
        pinned = self._pinned(ctx, entry)
        if pinned is not None:
            plan, label = [pinned], "pinned"
        else:
            plan, label = self.plan(ctx, entry)
        scratch["claims"] = []
        ctx.candidates = plan
        self._claim_next(ctx, scratch, skip_busy=pinned is None)
        ctx.deployment = plan[0]
        ctx.log["route_rule"] = label
        self.balancer.start(plan[0].id)
        scratch["busy"] = plan[0].id
        return None

    async def on_attempt(
        self,
        ctx: RequestContext,
        deployment: Deployment,
        error: GatewayError | None,
        elapsed_s: float,
    ) -> None:
        scratch = ctx.scratch_for(self.name)
        claims: list[str] = scratch.get("claims", [])
        held = deployment.id in claims  # this request holds the deployment's probe
        if held:
            claims.remove(deployment.id)  # the outcome below settles the probe
        if error is None:
            if ctx.stream:
                # Settled when the stream's outcome is known (on_response): a stream cut
                # midway is the deployment's failure, and a probe lasts until its end.
                scratch["served"] = deployment.id
            else:
                self.breakers.success(deployment.id)
            self.balancer.observe(deployment.id, elapsed_s)
            if self.config.expose_deployment:
                ctx.response_headers["x-gateway-deployment"] = deployment.id
            return
        self._end_busy(scratch)
        if not error.retryable or not error.deployment_fault:
            # The request's own fault (400 ...), its deadline running out, or a request this
            # provider cannot express (the next deployment may): nothing against the
            # deployment, and no retry spent. Only the probe's holder gives it back: a pinned
            # request may have gone to a deployment whose probe another request is running.
            if held:
                self.breakers.release(deployment.id)
            if not error.retryable:
                return
        else:
            retry_after = _seconds(error.headers.get("retry-after"), self.config.max_retry_after_s)
            self.breakers.failure(deployment.id, retry_after)
            log.info(
                "upstream attempt failed",
                extra={"request_id": ctx.request_id, "deployment": deployment.id,
                       "error": error.type, "status": error.status, "retry_after_s": retry_after},
            )  # fmt: skip
            if ctx.candidates:
                if not self.budget.withdraw():
                    ctx.log["retry_budget_exhausted"] = True
                    ctx.candidates.clear()
            elif await self._wait_retry_after(ctx, scratch, deployment, retry_after):
                ctx.candidates.append(deployment)
        self._claim_next(ctx, scratch, skip_busy=True)
        if ctx.candidates:
            self.balancer.start(ctx.candidates[0].id)
            scratch["busy"] = ctx.candidates[0].id
        elif "retry-after" in error.headers:
            # This error goes to the client: its Retry-After is no sooner than this gateway
            # will try the deployment again (its breaker may be open for longer than asked).
            wait = math.ceil(self.breakers.retry_in(deployment.id))
            if wait > _seconds(error.headers["retry-after"], math.inf):
                error.headers["retry-after"] = str(wait)

    def _claim_next(self, ctx: RequestContext, scratch: dict[str, Any], skip_busy: bool) -> None:
        """Claim the probe of the next candidate if it is half-open, and only of that one: a
        fallback this request may never try must not keep the probe from the requests that
        would use it (a claim is settled when its attempt ends). A half-open candidate whose
        probe another request holds is skipped (``skip_busy``; a pinned request waits for
        nothing and goes anyway)."""
        candidates = ctx.candidates
        while candidates:
            dep_id = candidates[0].id
            if self.breakers.state(dep_id) != HALF_OPEN:
                return
            if self.breakers.claim(dep_id):
                scratch["claims"].append(dep_id)
                return
            if not skip_busy:
                return
            candidates.pop(0)

    async def _wait_retry_after(
        self, ctx: RequestContext, scratch: dict[str, Any], dep: Deployment, seconds: float
    ) -> bool:
        """Nothing else to try: wait out a short Retry-After once, within the deadline. The
        wait is until the deployment's breaker lets a try through (the failure may have opened
        it for longer than the upstream asked: then no wait)."""
        if seconds <= 0 or scratch.get("waited"):
            return False
        wait = max(seconds, self.breakers.retry_in(dep.id))
        if wait > self.config.max_retry_wait_s:
            return False
        if ctx.deadline is not None and time.perf_counter() + wait >= ctx.deadline:
            return False
        if not self.budget.withdraw():
            ctx.log["retry_budget_exhausted"] = True
            return False
        scratch["waited"] = True
        await asyncio.sleep(wait + 0.001)  # (a timer may fire a hair early: then still open)
        return True

    def _end_busy(self, scratch: dict[str, Any]) -> None:
        busy = scratch.pop("busy", None)
        if busy is not None:
            self.balancer.end(busy)

    async def on_response(self, ctx: RequestContext) -> None:
        scratch = ctx.scratch_for(self.name)
        for dep_id in scratch.pop("claims", []):
            self.breakers.release(dep_id)
        self._end_busy(scratch)
        served = scratch.pop("served", None)
        if served is not None:
            if ctx.upstream_failed:
                # The stream began, then failed (cut or stalled midway, an error event): the
                # breaker counts it like a failure before the first byte.
                self.breakers.failure(served)
            else:
                self.breakers.success(served)

    def health(self) -> dict[str, Any]:
        """Routing detail for ``/readyz``: breaker state, load and latency per deployment."""
        deployments = self.breakers.health()
        for dep_id, entry in deployments.items():
            entry["in_flight"] = self.balancer.busy.get(dep_id, 0)
            if dep_id in self.balancer.latency:
                entry["latency_ms"] = round(self.balancer.latency[dep_id] * 1000, 2)
        return {
            "balance": self.config.balance,
            "deployments": deployments,
            "retry_budget": {
                "tokens": round(self.budget.tokens, 2),
                "exhausted": self.budget.exhausted,
            },
        }


def _seconds(value: str | None, cap: float) -> float:
    if not value:
        return 0.0
    try:
        return min(max(0.0, float(value)), cap)
    except ValueError:
        return 0.0
