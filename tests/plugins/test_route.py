"""The route plugin: config validation and unit tests of rules, balancing, breakers, budget."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
from pydantic import ValidationError

from gateway.catalogue import Catalogue, ModelEntry
from gateway.config import ConfigError
from gateway.context import Identity, RequestContext
from gateway.errors import (
    ContextLengthError,
    DeadlineExceededError,
    InvalidRequestError,
    ServiceUnavailableError,
    UnsupportedByDeploymentError,
    UpstreamError,
)
from plugins.route import RoutePlugin
from plugins.route.balance import Balancer
from plugins.route.breaker import CLOSED, HALF_OPEN, OPEN, Breakers
from plugins.route.budget import RetryBudget
from plugins.route.config import RouteConfig


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def catalogue() -> Catalogue:
    def dep(i: str, **kw: Any) -> dict[str, Any]:
        return {"id": i, "model": f"{i}-up", "base_url": "http://127.0.0.1:1/v1", **kw}

    entries = (
        ModelEntry.model_validate({"name": "smart", "fallbacks": ["backup"], "deployments": [
            dep("big", weight=3, price={"input_per_mtok": 10}, context_window=100_000),
            dep("small", price={"input_per_mtok": 1}, capabilities=["streaming"],
                context_window=60),
        ]}),
        ModelEntry.model_validate({"name": "backup", "deployments": [dep("bk")]}),
    )  # fmt: skip
    return Catalogue(entries)


def plugin(clock: Clock | None = None, **config: Any) -> RoutePlugin:
    p = RoutePlugin(RouteConfig.model_validate(config), clock=clock or Clock(), seed=1)
    p.bind(catalogue())
    return p


def ctx(text: str = "hi", identity: Identity | None = None, **body: Any) -> RequestContext:
    body = {"model": "smart", "messages": [{"role": "user", "content": text}], **body}
    c = RequestContext("r1", "chat", "/v1/chat/completions", "POST", {}, [], body)
    c.model = "smart"
    c.model_entry = catalogue().get("smart")
    c.identity = identity
    c.stream = bool(body.get("stream"))
    return c


def ids(c: RequestContext) -> list[str]:
    return [d.id for d in c.candidates]


# ---- config -------------------------------------------------------------------------------


def test_rule_without_action_is_rejected() -> None:
    with pytest.raises(
        ValidationError, match="a rule needs at least one of 'model', 'deployments'"
    ):
        RouteConfig.model_validate({"rules": [{"when": {"tiers": ["free"]}}]})


def test_unknown_keys_and_bad_values_are_rejected() -> None:
    with pytest.raises(ValidationError, match="unknown key 'tier'; allowed keys: "):
        RouteConfig.model_validate({"rules": [{"when": {"tier": ["free"]}, "cheapest": True}]})
    with pytest.raises(
        ValidationError, match="Input should be 'weighted', 'least_busy' or 'latency'"
    ):
        RouteConfig.model_validate({"balance": "random"})
    with pytest.raises(ValidationError, match="greater than or equal to 1"):
        RouteConfig.model_validate({"breaker": {"failures": 0}})


def test_rules_naming_unknown_models_or_deployments_fail_at_startup() -> None:
    p = RoutePlugin(RouteConfig.model_validate({"rules": [{"model": "nope"}]}))
    with pytest.raises(
        ConfigError, match=r"rules\[0\]: unknown model 'nope'; known: smart, backup"
    ):
        p.bind(catalogue())
    p = RoutePlugin(RouteConfig.model_validate({"rules": [{"deployments": ["x"]}]}))
    with pytest.raises(ConfigError, match=r"rules\[0\].deployments: unknown deployment 'x'"):
        p.bind(catalogue())


# ---- planning -----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_default_plan_is_model_then_fallbacks_with_deadline() -> None:
    p = plugin(deadline_s=7, plain_deadline_s=9)
    c = ctx()
    await p.on_request(c)
    assert set(ids(c)[:2]) == {"big", "small"} and ids(c)[2] == "bk"
    assert c.deployment is c.candidates[0]
    # A plain answer arrives whole: its deadline bounds all of it, a stream's only its start.
    assert c.deadline is not None and c.deadline - c.started == pytest.approx(9, abs=0.5)
    c = ctx(stream=True)
    await p.on_request(c)
    assert c.deadline is not None and c.deadline - c.started == pytest.approx(7, abs=0.5)


@pytest.mark.anyio
async def test_rules_by_tier_role_and_request_type() -> None:
    p = plugin(rules=[
        {"name": "img", "when": {"images": True}, "model": "backup", "fallbacks": False},
        {"name": "free", "when": {"tiers": ["free"]}, "deployments": ["small"]},
        {"name": "ops", "when": {"roles": ["ops"], "stream": True}, "deployments": ["big"]},
    ])  # fmt: skip
    c = ctx(identity=Identity("u", tier="free"))
    await p.on_request(c)
    assert ids(c) == ["small", "bk"] and c.log["route_rule"] == "free"
    c = ctx(identity=Identity("u", roles=("ops",)), stream=True)
    await p.on_request(c)
    assert ids(c) == ["big", "bk"]
    image = [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]
    c = ctx(identity=Identity("u", tier="free"))
    c.body["messages"] = [{"role": "user", "content": image}]
    await p.on_request(c)
    assert ids(c) == ["bk"] and c.log["route_rule"] == "img"
    c = ctx()  # no identity: tier and role rules do not match
    await p.on_request(c)
    assert c.log["route_rule"] == "default"


@pytest.mark.anyio
async def test_capabilities_and_context_filter_the_plan() -> None:
    p = plugin()
    c = ctx(tools=[{"type": "function", "function": {"name": "f"}}])
    await p.on_request(c)
    assert "small" not in ids(c)  # small has no tools capability
    c = ctx(text="word " * 100)
    await p.on_request(c)
    assert "small" not in ids(c)  # 100+ tokens do not fit a 60-token window
    c = ctx(text="hi", max_tokens=200_000)
    with pytest.raises(ContextLengthError):
        await p.on_request(c)


@pytest.mark.anyio
async def test_no_capable_deployment_is_a_400() -> None:
    p = plugin(rules=[{"deployments": ["small"], "fallbacks": False}])
    with pytest.raises(InvalidRequestError, match="supports: tools"):
        await p.on_request(ctx(tools=[{"type": "function", "function": {"name": "f"}}]))


@pytest.mark.anyio
async def test_cheapest_orders_by_estimated_price() -> None:
    p = plugin(rules=[{"cheapest": True}])
    for _ in range(5):
        c = ctx()
        await p.on_request(c)
        assert ids(c) == ["small", "big", "bk"]


# ---- attempts, breakers, budget -----------------------------------------------------------


def retryable(status: int = 503, **headers: str) -> UpstreamError:
    err = UpstreamError("down", retryable=True, headers=headers)
    err.status = status
    return err


@pytest.mark.anyio
async def test_breaker_opens_skips_then_half_opens_one_probe() -> None:
    clock = Clock()
    p = plugin(clock, breaker={"failures": 2, "cooldown_s": 10}, rules=[{"deployments": ["big"]}])
    big = p.by_id["big"]
    for _ in range(2):
        c = ctx()
        await p.on_request(c)
        await p.on_attempt(c, c.candidates.pop(0), retryable(), 0.01)
        await p.on_response(c)
    assert p.breakers.state("big") == OPEN
    c = ctx()
    await p.on_request(c)
    assert ids(c) == ["bk"]
    clock.now += 10
    assert p.breakers.state("big") == HALF_OPEN
    probe, other = ctx(), ctx()
    await p.on_request(probe)
    await p.on_request(other)
    assert ids(probe) == ["big", "bk"] and ids(other) == ["bk"]  # one probe at a time
    await p.on_attempt(probe, big, None, 0.01)
    assert p.breakers.state("big") == CLOSED
    assert probe.response_headers["x-gateway-deployment"] == "big"


def half_open(dep_id: str, big_only: bool = True) -> RoutePlugin:
    """A plugin (breaker: 1 failure, 5 s cool-down; with ``big_only`` a rule sending every
    request to ``big`` first) whose deployment ``dep_id`` failed and has just half-opened."""
    clock = Clock()
    rules = [{"deployments": ["big"]}] if big_only else []
    p = plugin(clock, breaker={"failures": 1, "cooldown_s": 5}, rules=rules)
    p.breakers.failure(dep_id)
    clock.now += 5
    return p


@pytest.mark.anyio
async def test_unused_probe_is_released_and_failed_probe_reopens() -> None:
    p = half_open("big")
    c = ctx()
    await p.on_request(c)
    await p.on_response(c)  # answered without trying the probe (e.g. a cache hit)
    assert p.breakers.available("big")
    c = ctx()
    await p.on_request(c)
    await p.on_attempt(c, c.candidates.pop(0), retryable(), 0.01)
    assert p.breakers.state("big") == OPEN and p.breakers.retry_in("big") == 5


def backup_ctx() -> RequestContext:
    c = ctx()
    c.model = "backup"
    c.model_entry = catalogue().get("backup")
    return c


@pytest.mark.anyio
async def test_a_half_open_fallback_is_claimed_only_when_its_turn_comes() -> None:
    """A request that lists a half-open deployment only as a fallback must not hold its probe:
    the requests for that deployment's own model would be refused for as long as it runs."""
    p = half_open("bk", big_only=False)
    a = ctx()
    await p.on_request(a)
    assert ids(a)[-1] == "bk" and p.breakers.available("bk")  # listed, not claimed
    b = backup_ctx()
    await p.on_request(b)  # backup's own request takes the probe
    assert ids(b) == ["bk"] and not p.breakers.available("bk")
    # a's own deployments fail: bk's probe is b's, so a skips it instead of queueing on it.
    while len(a.candidates) > 1:
        await p.on_attempt(a, a.candidates.pop(0), retryable(), 0.01)
    assert a.candidates == []
    await p.on_attempt(b, b.candidates.pop(0), None, 0.01)
    assert p.breakers.state("bk") == CLOSED


@pytest.mark.anyio
async def test_a_half_open_fallback_is_probed_when_the_earlier_ones_fail() -> None:
    p = half_open("bk")
    c = ctx()
    await p.on_request(c)
    assert ids(c) == ["big", "bk"] and p.breakers.available("bk")
    await p.on_attempt(c, c.candidates.pop(0), retryable(), 0.01)
    assert ids(c) == ["bk"] and not p.breakers.available("bk")  # claimed now: its turn
    await p.on_response(c)  # answered otherwise (or given up): the probe is free again
    assert p.breakers.available("bk")


@pytest.mark.anyio
async def test_only_the_probes_holder_gives_it_back() -> None:
    """A pinned request may go to a half-open deployment whose probe another request runs; its
    own 400 (or deadline) must not free that probe, or a third request probes at once."""
    p = half_open("big")
    probe = ctx()
    await p.on_request(probe)
    assert ids(probe)[0] == "big" and not p.breakers.available("big")
    pinned = ctx(identity=Identity(user="ops", roles=("admin",)))
    pinned.headers["x-gateway-deployment"] = "big"
    await p.on_request(pinned)
    assert ids(pinned) == ["big"]
    await p.on_attempt(pinned, pinned.candidates.pop(0), InvalidRequestError("bad"), 0.01)
    await p.on_attempt(pinned, p.by_id["big"], DeadlineExceededError("late", retryable=True), 1)
    await p.on_response(pinned)
    assert not p.breakers.available("big")  # still the first request's probe
    await p.on_attempt(probe, probe.candidates.pop(0), None, 0.01)
    assert p.breakers.state("big") == CLOSED


@pytest.mark.anyio
async def test_deadline_and_unsupported_requests_are_not_the_deployments_fault() -> None:
    p = plugin(breaker={"failures": 1}, retry_budget={"ratio": 0, "floor_per_s": 0, "burst": 1})
    c = ctx()
    await p.on_request(c)
    tokens = p.budget.tokens
    first = c.candidates.pop(0)
    # An Anthropic deployment cannot express n > 1: the next one is tried (no retry budget is
    # spent: nothing was sent), and nothing counts against the first.
    await p.on_attempt(c, first, UnsupportedByDeploymentError("n > 1", param="n"), 0.0)
    assert c.candidates and p.breakers.state(first.id) == CLOSED
    second = c.candidates.pop(0)
    await p.on_attempt(c, second, DeadlineExceededError("late", retryable=True), 1.0)
    assert p.breakers.state(second.id) == CLOSED
    assert p.breakers.circuits[second.id].failures == 0
    assert p.budget.tokens == tokens  # neither spent a retry
    # The same timeout from the deployment's own first-byte limit opens it (failures: 1).
    third = c.candidates.pop(0)
    await p.on_attempt(c, third, UpstreamError("slow", retryable=True), 1.0)
    assert p.breakers.state(third.id) == OPEN


@pytest.mark.anyio
async def test_a_stream_is_settled_by_its_outcome_not_its_first_byte() -> None:
    clock = Clock()
    p = plugin(clock, breaker={"failures": 2, "cooldown_s": 5}, rules=[{"deployments": ["big"]}])
    for _ in range(2):
        c = ctx(stream=True)
        await p.on_request(c)
        await p.on_attempt(c, c.candidates.pop(0), None, 0.01)  # the first bytes came
        c.upstream_failed = True  # then the stream broke
        await p.on_response(c)
    assert p.breakers.state("big") == OPEN
    clock.now += 5
    probe = ctx(stream=True)
    await p.on_request(probe)
    await p.on_attempt(probe, probe.candidates.pop(0), None, 0.01)
    assert p.breakers.state("big") == HALF_OPEN  # the probe lasts until the stream ends
    await p.on_response(probe)
    assert p.breakers.state("big") == CLOSED


@pytest.mark.anyio
async def test_all_breakers_open_is_a_503_with_retry_after() -> None:
    clock = Clock()
    p = plugin(clock, breaker={"failures": 1, "cooldown_s": 9.5})
    for dep_id in ("big", "small", "bk"):
        p.breakers.failure(dep_id)
    with pytest.raises(ServiceUnavailableError) as exc:
        await p.on_request(ctx())
    assert exc.value.headers == {"retry-after": "10"}


@pytest.mark.anyio
async def test_retry_after_opens_the_breaker_for_that_long() -> None:
    clock = Clock()
    p = plugin(clock, breaker={"failures": 5, "cooldown_s": 1}, max_retry_after_s=60)
    c = ctx()
    await p.on_request(c)
    first = c.candidates.pop(0)
    await p.on_attempt(c, first, retryable(429, **{"retry-after": "120"}), 0.01)
    assert p.breakers.retry_in(first.id) == 60  # capped by max_retry_after_s
    assert first.id not in ids(c)


@pytest.mark.anyio
async def test_request_errors_do_not_count_against_the_deployment() -> None:
    p = plugin(breaker={"failures": 1})
    c = ctx()
    await p.on_request(c)
    await p.on_attempt(c, c.candidates.pop(0), InvalidRequestError("bad"), 0.01)
    assert all(p.breakers.state(d) == CLOSED for d in ("big", "small", "bk"))


@pytest.mark.anyio
async def test_retry_budget_bounds_retries_to_ratio_of_requests() -> None:
    clock = Clock()
    p = plugin(clock, breaker={"failures": 10_000},
               retry_budget={"ratio": 0.2, "floor_per_s": 0, "burst": 3})  # fmt: skip
    retries = 0
    for _ in range(500):
        c = ctx()
        await p.on_request(c)
        while c.candidates:
            dep = c.candidates.pop(0)
            if len(c.attempt_log) > 0:
                retries += 1
            c.attempt_log.append({})
            await p.on_attempt(c, dep, retryable(), 0.01)
        await p.on_response(c)
    assert retries <= 0.2 * 500 + 3
    assert retries >= 0.2 * 500 - 1  # and the budget is actually used
    assert p.health()["retry_budget"]["exhausted"] > 0


def test_budget_floor_refills_with_time() -> None:
    clock = Clock()
    b = RetryBudget(ratio=0, floor_per_s=2, burst=5, clock=clock)
    for _ in range(5):
        assert b.withdraw()
    assert not b.withdraw()
    clock.now += 1
    assert b.withdraw() and b.withdraw() and not b.withdraw()


# ---- balancing ----------------------------------------------------------------------------


def test_weighted_first_pick_follows_weights() -> None:
    deps = list(catalogue().get("smart").deployments)  # type: ignore[union-attr]
    b = Balancer("weighted", seed=7)
    n = 20_000
    counts = Counter(b.order(deps)[0].id for _ in range(n))
    assert abs(counts["big"] / n - 0.75) < 0.015  # 5 standard deviations


def test_least_busy_prefers_idle_deployment_per_weight() -> None:
    deps = list(catalogue().get("smart").deployments)  # type: ignore[union-attr]
    b = Balancer("least_busy", seed=7)
    for _ in range(3):
        b.start("big")
    assert b.order(deps)[0].id == "small"  # (3+1)/3 > (0+1)/1
    b.end("big")
    b.end("big")
    assert b.order(deps)[0].id == "big"  # (1+1)/3 < 1


def test_latency_prefers_faster_and_tries_unmeasured() -> None:
    deps = list(catalogue().get("smart").deployments)  # type: ignore[union-attr]
    b = Balancer("latency", alpha=0.5, seed=7)
    b.observe("big", 0.2)
    assert b.order(deps)[0].id == "small"  # no sample yet: explored first
    b.observe("small", 1.0)
    assert b.order(deps)[0].id == "big"
    b.observe("big", 3.0)
    assert b.latency["big"] == pytest.approx(1.6)
    assert b.order(deps)[0].id == "big"  # 1.6 s / weight 3 still beats 1.0 s / weight 1
    b.observe("big", 10.0)
    assert b.order(deps)[0].id == "small"


def test_health_reports_state_load_and_latency() -> None:
    clock = Clock()
    p = plugin(clock, breaker={"failures": 1, "cooldown_s": 3})
    p.breakers.failure("small")
    p.balancer.observe("big", 0.25)
    h = p.health()
    assert h["deployments"]["small"] == {"state": "open", "consecutive_failures": 1,
                                         "retry_in_s": 3.0, "in_flight": 0}  # fmt: skip
    assert h["deployments"]["big"]["latency_ms"] == 250.0
    assert h["balance"] == "weighted"


def test_breakers_unit() -> None:
    clock = Clock()
    b = Breakers(2, 5, clock)
    b.failure("d")
    assert b.state("d") == CLOSED
    b.success("d")
    b.failure("d")
    assert b.state("d") == CLOSED  # consecutive, not total
    b.failure("d")
    assert b.state("d") == OPEN and not b.available("d")
