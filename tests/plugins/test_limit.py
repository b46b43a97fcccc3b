"""limit plugin: config validation and unit tests against the in-memory store."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from gateway.config import ConfigError, parse_settings
from gateway.context import RequestContext
from gateway.errors import QuotaExceededError, RateLimitError
from gateway.pipeline import build_pipeline
from plugins.limit import LimitConfig
from plugins.limit.headers import format_duration

from ..helpers import tokenized_texts
from .test_limit_helpers import Clock, finish, make_ctx, make_plugin

# --- config -----------------------------------------------------------------------------------


def _settings(limit_config: dict[str, object]) -> object:
    raw = {
        "models": [{"name": "demo", "deployments": [{"model": "m", "base_url": "http://x"}]}],
        "pipeline": [{"name": "limit", "config": limit_config}],
    }
    return build_pipeline(parse_settings(raw, "config.yaml"))  # type: ignore[arg-type]


def test_config_unknown_key_names_the_allowed_ones() -> None:
    with pytest.raises(ConfigError) as e:
        _settings({"rules": [{"scope": "user", "rpm": 1, "rmp": 2}]})
    msg = str(e.value)
    assert msg.startswith("config.yaml: pipeline[0].config.rules[0]: unknown key 'rmp'")
    assert "allowed keys: budget_usd, max_parallel, model, rpm, scope, tier, tpm" in msg


def test_config_rule_without_any_limit_is_refused() -> None:
    with pytest.raises(ValidationError, match="a rule needs at least one limit"):
        LimitConfig.model_validate({"rules": [{"scope": "user", "tier": "free"}]})


def test_config_bad_scope_store_and_budget() -> None:
    with pytest.raises(ValidationError, match="Input should be 'user', 'tenant', 'key'"):
        LimitConfig.model_validate({"rules": [{"scope": "team", "rpm": 1}]})
    with pytest.raises(ValidationError, match="store must be 'memory' or a redis://"):
        LimitConfig.model_validate(
            {"store": "memcached://x", "rules": [{"scope": "user", "rpm": 1}]}
        )
    with pytest.raises(ValidationError, match="budget_usd needs 'day' and/or 'month'"):
        LimitConfig.model_validate({"rules": [{"scope": "tenant", "budget_usd": {}}]})
    with pytest.raises(ValidationError, match="greater than 0"):
        LimitConfig.model_validate({"rules": [{"scope": "user", "rpm": 0}]})
    with pytest.raises(ValidationError, match="at least 1 item"):
        LimitConfig.model_validate({"rules": []})


def test_config_accepts_limits_style_redis_url() -> None:
    cfg = LimitConfig.model_validate(
        {"store": "async+redis://127.0.0.1:6379/0", "rules": [{"scope": "user", "rpm": 1}]}
    )
    assert cfg.store == "redis://127.0.0.1:6379/0"


# --- requests per minute ------------------------------------------------------------------------


@pytest.mark.anyio
async def test_rpm_admits_the_limit_then_429_with_retry_after_and_headers() -> None:
    clock = Clock()
    plugin = make_plugin(clock, rules=[{"scope": "user", "rpm": 3}])
    remaining, resets = [], []
    for _ in range(3):
        ctx = make_ctx()
        await plugin.on_request(ctx)
        remaining.append(ctx.response_headers["x-ratelimit-remaining-requests"])
        # reset: when the oldest counted request leaves the window
        resets.append(ctx.response_headers["x-ratelimit-reset-requests"])
        assert ctx.response_headers["x-ratelimit-limit-requests"] == "3"
        clock.advance(10)
    assert remaining == ["2", "1", "0"]
    assert resets == ["1m0s", "50s", "40s"]
    ctx = make_ctx()
    with pytest.raises(RateLimitError) as e:
        await plugin.on_request(ctx)
    err = e.value
    assert (err.status, err.code, type(err)) == (429, "rate_limit_exceeded", RateLimitError)
    # The first request (30 s ago) leaves the window in 30 s.
    assert err.headers["retry-after"] == "30"
    assert err.headers["retry-after-ms"] == "30000"
    assert "requests per minute" in err.message and "scope user" in err.message
    assert ctx.response_headers["x-ratelimit-remaining-requests"] == "0"
    assert ctx.response_headers["x-ratelimit-reset-requests"] == "30s"
    clock.advance(30)
    await plugin.on_request(make_ctx())  # one slot came back


@pytest.mark.anyio
async def test_rpm_moving_window_has_no_burst_at_window_edges() -> None:
    # A fixed window would admit 3 at 0:59 and 3 more at 1:01 (6 in 2 s).
    clock = Clock()
    clock.advance(59)
    plugin = make_plugin(clock, rules=[{"scope": "user", "rpm": 3}])
    for _ in range(3):
        await plugin.on_request(make_ctx())
    clock.advance(2)
    with pytest.raises(RateLimitError):
        await plugin.on_request(make_ctx())
    clock.advance(57.5)  # 59.5 s after the burst: still inside its minute
    with pytest.raises(RateLimitError):
        await plugin.on_request(make_ctx())
    clock.advance(0.5)
    await plugin.on_request(make_ctx())


@pytest.mark.anyio
async def test_tightest_limit_wins_and_shows_in_headers() -> None:
    plugin = make_plugin(rules=[{"scope": "user", "rpm": 5}, {"scope": "tenant", "rpm": 2}])
    await plugin.on_request(make_ctx("alice"))
    ctx = make_ctx("bob")
    await plugin.on_request(ctx)
    assert ctx.response_headers["x-ratelimit-limit-requests"] == "2"
    assert ctx.response_headers["x-ratelimit-remaining-requests"] == "0"
    with pytest.raises(RateLimitError, match="scope tenant"):
        await plugin.on_request(make_ctx("carol"))
    # Another tenant is not affected.
    await plugin.on_request(make_ctx("dave", tenant="other"))


@pytest.mark.anyio
async def test_a_refused_request_consumes_nothing() -> None:
    plugin = make_plugin(
        rules=[{"scope": "tenant", "rpm": 2}, {"scope": "user", "max_parallel": 1}]
    )
    await plugin.on_request(make_ctx("alice"))
    for _ in range(3):  # refused by alice's parallel limit: tenant rpm must not be used up
        with pytest.raises(RateLimitError, match="in flight"):
            await plugin.on_request(make_ctx("alice"))
    await plugin.on_request(make_ctx("bob"))
    with pytest.raises(RateLimitError, match="requests per minute"):
        await plugin.on_request(make_ctx("carol"))


@pytest.mark.anyio
async def test_tier_filter_and_model_scope() -> None:
    plugin = make_plugin(
        rules=[
            {"scope": "user", "tier": "free", "rpm": 1},
            {"scope": "model", "rpm": 3},
        ]
    )
    await plugin.on_request(make_ctx("free-user", tier="free"))
    with pytest.raises(RateLimitError, match="scope user"):
        await plugin.on_request(make_ctx("free-user", tier="free"))
    await plugin.on_request(make_ctx("pro-user", tier="pro"))
    await plugin.on_request(make_ctx("pro-user", tier="pro"))
    # The model's own limit counts every caller: 3 admitted in all.
    with pytest.raises(RateLimitError, match="scope model"):
        await plugin.on_request(make_ctx("pro-user", tier="pro"))


@pytest.mark.anyio
async def test_plans_are_reused_per_caller_but_follow_identity_changes() -> None:
    # Plans are cached per (identity, model): a caller whose tier or tenant changes (a key
    # re-issued, a JWT with other claims) must be planned anew, not served the old plan.
    plugin = make_plugin(rules=[{"scope": "user", "tier": "free", "rpm": 1},
                                {"scope": "tenant", "rpm": 2}])  # fmt: skip
    await plugin.on_request(make_ctx("alice", tier="free"))
    with pytest.raises(RateLimitError, match="scope user"):
        await plugin.on_request(make_ctx("alice", tier="free"))
    await plugin.on_request(make_ctx("alice", tier="pro"))  # no per-user rule for pro
    with pytest.raises(RateLimitError, match="scope tenant"):
        await plugin.on_request(make_ctx("alice", tier="pro"))
    await plugin.on_request(make_ctx("alice", tier="pro", tenant="other"))


@pytest.mark.anyio
async def test_anonymous_callers_are_keyed_by_client_ip() -> None:
    plugin = make_plugin(
        rules=[{"scope": "user", "rpm": 1}, {"scope": "key", "tier": "anonymous", "rpm": 1}]
    )
    await plugin.on_request(make_ctx(None, client="127.0.0.2"))
    with pytest.raises(RateLimitError):
        await plugin.on_request(make_ctx(None, client="127.0.0.2"))
    await plugin.on_request(make_ctx(None, client="127.0.0.3"))
    # An authenticated user from the same address has a counter of their own.
    await plugin.on_request(make_ctx("alice", client="127.0.0.2"))


def test_key_values_cannot_collide_across_scopes() -> None:
    from plugins.limit import scopes

    cfg = LimitConfig.model_validate({"rules": [{"scope": "user", "model": "demo", "tpm": 9}]})
    plain = LimitConfig.model_validate({"rules": [{"scope": "user", "tpm": 9}]})
    a = scopes.plan(cfg, make_ctx("alice"))
    b = scopes.plan(plain, make_ctx("alice/model/demo"))
    assert a.tpm[0].key == "tpm/user/alice/model/demo"
    assert b.tpm[0].key == "tpm/user/alice%2Fmodel%2Fdemo"


# --- tokens per minute ------------------------------------------------------------------------


@pytest.mark.anyio
async def test_tpm_reservations_refuse_concurrent_overshoot_then_return_unused() -> None:
    plugin = make_plugin(rules=[{"scope": "user", "tpm": 1000}])
    first, second = make_ctx(max_tokens=400), make_ctx(max_tokens=400)
    await plugin.on_request(first)
    await plugin.on_request(second)
    reserved = first.log["limit"]["reserved_tokens"]
    assert 400 < reserved < 420  # prompt ("hello" + framing) + max_tokens
    assert first.response_headers["x-ratelimit-remaining-tokens"] == str(1000 - reserved)
    assert second.response_headers["x-ratelimit-remaining-tokens"] == str(1000 - 2 * reserved)
    # Neither has finished, and a third would not fit: refused.
    third = make_ctx(max_tokens=400)
    with pytest.raises(RateLimitError, match="tokens per minute") as e:
        await plugin.on_request(third)
    assert int(e.value.headers["retry-after"]) >= 1
    assert third.response_headers["x-ratelimit-remaining-tokens"] == str(1000 - 2 * reserved)
    # The first used only 15 tokens: the rest of its reservation comes back.
    await plugin.on_response(finish(first, 10, 5))
    await plugin.on_request(third)
    assert third.response_headers["x-ratelimit-remaining-tokens"] == str(1000 - 15 - 2 * reserved)


@pytest.mark.anyio
async def test_tpm_reserves_a_small_prompts_byte_count_without_tokenizing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A prompt whose UTF-8 byte count (never fewer than its tokens) is at most 1% of the
    smallest TPM limit reserves that count instead of being tokenized; the answer's usage
    settles it as usual. A larger one is counted exactly."""
    calls = tokenized_texts(monkeypatch)
    plugin = make_plugin(
        rules=[{"scope": "user", "tpm": 100_000}, {"scope": "tenant", "tpm": 10_000}]
    )
    small = make_ctx(prompt="hello " * 10, max_tokens=100)  # 66 bytes with the framing
    await plugin.on_request(small)
    assert calls == [] and small.prompt_tokens_estimate is None
    assert small.log["limit"] == {"reserved_tokens": 66 + 100}
    assert small.response_headers["x-ratelimit-remaining-tokens"] == str(10_000 - 166)
    await plugin.on_response(finish(small, 11, 5))
    after = make_ctx(prompt="hi", max_tokens=1)
    await plugin.on_request(after)
    assert after.response_headers["x-ratelimit-remaining-tokens"] == str(10_000 - 16 - 9)
    # 106 bytes: over 1% of the tenant's 10,000, so counted.
    large = make_ctx(prompt="hello " * 100, max_tokens=100)
    await plugin.on_request(large)
    assert calls == ["hello " * 100]
    assert large.log["limit"] == {"reserved_tokens": large.prompt_tokens_estimate + 100}
    assert large.prompt_tokens_estimate < 606


@pytest.mark.anyio
async def test_tpm_a_request_too_large_by_its_bound_is_counted_before_refusal() -> None:
    plugin = make_plugin(rules=[{"scope": "user", "tpm": 1_000_000}])
    prompt = "hello " * 100  # 606 bytes, 106 tokens
    fits = make_ctx(prompt=prompt, max_tokens=1_000_000 - 300)
    await plugin.on_request(fits)  # 606 + cap is over the limit; 106 + cap is not
    assert fits.prompt_tokens_estimate is not None and fits.prompt_tokens_estimate < 300
    with pytest.raises(RateLimitError, match="Request too large"):
        await plugin.on_request(make_ctx(prompt=prompt, max_tokens=1_000_000))


@pytest.mark.anyio
async def test_tpm_default_cap_n_and_max_completion_tokens() -> None:
    # A limit this small has every prompt tokenized (its bound is over 1% of the limit).
    plugin = make_plugin(default_max_tokens=50, rules=[{"scope": "user", "tpm": 100}])

    def tokens(ctx: RequestContext) -> int:
        reserved, usd = plugin.reservation(ctx, plugin.plan(ctx))
        assert usd == 0.0  # no budget
        return reserved

    base = tokens(make_ctx(max_tokens=None)) - 50
    assert tokens(make_ctx(max_tokens=7)) == base + 7
    assert tokens(make_ctx(max_tokens=7, max_completion_tokens=9)) == base + 9
    assert tokens(make_ctx(max_tokens=7, n=3)) == base + 21
    assert tokens(make_ctx(max_tokens=None, endpoint="embeddings", input="hello world")) == 2


@pytest.mark.anyio
async def test_tpm_request_larger_than_the_limit_is_refused_without_retry_after() -> None:
    plugin = make_plugin(rules=[{"scope": "user", "tpm": 100}])
    with pytest.raises(RateLimitError, match="Request too large") as e:
        await plugin.on_request(make_ctx(max_tokens=500))
    assert "retry-after" not in e.value.headers


@pytest.mark.anyio
async def test_tpm_sliding_window_frees_tokens_gradually() -> None:
    clock = Clock()
    plugin = make_plugin(clock, rules=[{"scope": "user", "tpm": 1000}])
    ctx = make_ctx(max_tokens=900)
    await plugin.on_request(ctx)
    await plugin.on_response(finish(ctx, 0, 900))  # used all it reserved
    clock.advance(60)  # next minute: the 900 weigh fully at its start...
    with pytest.raises(RateLimitError) as e:
        await plugin.on_request(make_ctx(max_tokens=400))
    # ...and ~half of them after 30 s (900 * 0.5 + ~410 <= 1000 after ~28 s).
    assert 20 <= int(e.value.headers["retry-after"]) <= 30
    clock.advance(30)
    await plugin.on_request(make_ctx(max_tokens=400))


@pytest.mark.anyio
async def test_denied_by_a_later_plugin_releases_the_whole_reservation() -> None:
    plugin = make_plugin(rules=[{"scope": "user", "tpm": 1000, "max_parallel": 1}])
    ctx = make_ctx(max_tokens=900)
    await plugin.on_request(ctx)
    # A later plugin (guard) raised 400: the core calls on_response with no usage.
    await plugin.on_response(finish(ctx, status=400, usage=False))
    again = make_ctx(max_tokens=900)
    await plugin.on_request(again)
    assert again.response_headers["x-ratelimit-remaining-tokens"] == str(
        1000 - again.log["limit"]["reserved_tokens"]
    )
    # on_response twice (defensive) does not give back twice.
    await plugin.on_response(finish(ctx, status=400, usage=False))
    with pytest.raises(RateLimitError):
        await plugin.on_request(make_ctx(max_tokens=10))


# --- concurrency ----------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize(
    "how",
    [
        {"status": 200, "prompt_tokens": 5, "completion_tokens": 5},
        {"status": 502, "usage": False},
        {"status": 499, "prompt_tokens": 5, "completion_tokens": 2, "disconnected": True},
    ],
    ids=["completion", "error", "disconnect"],
)
async def test_parallel_slot_is_released_on_completion_error_and_disconnect(how: dict) -> None:
    plugin = make_plugin(rules=[{"scope": "user", "max_parallel": 2}])
    a, b = make_ctx(), make_ctx()
    await plugin.on_request(a)
    await plugin.on_request(b)
    with pytest.raises(RateLimitError, match="requests in flight") as e:
        await plugin.on_request(make_ctx())
    assert e.value.headers["retry-after"] == "1"
    await plugin.on_response(finish(a, **how))
    c = make_ctx()
    await plugin.on_request(c)
    with pytest.raises(RateLimitError):
        await plugin.on_request(make_ctx())


@pytest.mark.anyio
async def test_parallel_slot_of_a_lost_request_expires() -> None:
    clock = Clock()
    plugin = make_plugin(
        clock, parallel_slot_ttl_s=30, rules=[{"scope": "user", "max_parallel": 1}]
    )
    await plugin.on_request(make_ctx())  # never finished (a crashed worker)
    with pytest.raises(RateLimitError):
        await plugin.on_request(make_ctx())
    clock.advance(31)
    await plugin.on_request(make_ctx())


@pytest.mark.anyio
async def test_every_refusal_carries_the_request_and_token_headers() -> None:
    """As OpenAI's 429s do: a max_parallel refusal still says how many requests and tokens
    are left, and an rpm refusal how many tokens."""
    plugin = make_plugin(rules=[{"scope": "user", "rpm": 3, "tpm": 100_000, "max_parallel": 1}])
    first = make_ctx()
    await plugin.on_request(first)
    reserved = first.log["limit"]["reserved_tokens"]
    busy = make_ctx()
    with pytest.raises(RateLimitError, match="in flight"):
        await plugin.on_request(busy)
    h = busy.response_headers
    assert (h["x-ratelimit-limit-requests"], h["x-ratelimit-remaining-requests"]) == ("3", "2")
    assert h["x-ratelimit-remaining-tokens"] == str(100_000 - reserved)
    assert h["x-ratelimit-reset-requests"].endswith("s")
    await plugin.on_response(finish(first, 10, 10))
    for _ in range(2):
        ctx = make_ctx()
        await plugin.on_request(ctx)
        await plugin.on_response(finish(ctx, 10, 10))
    over = make_ctx()
    with pytest.raises(RateLimitError, match="requests per minute"):
        await plugin.on_request(over)
    h = over.response_headers
    assert h["x-ratelimit-remaining-requests"] == "0"
    assert h["x-ratelimit-remaining-tokens"] == str(100_000 - 60)
    assert h["x-ratelimit-limit-tokens"] == "100000"


# --- budgets --------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_budget_crossed_mid_day_blocks_next_request_until_next_day() -> None:
    clock = Clock()
    clock.advance(12 * 3600)  # noon UTC
    plugin = make_plugin(clock, rules=[{"scope": "tenant", "budget_usd": {"day": 0.01}}])
    # $10 per million prompt tokens: 600 tokens = $0.006.
    ctx = make_ctx()
    await plugin.on_request(ctx)
    await plugin.on_response(finish(ctx, 600, 0))
    ctx = make_ctx("bob")  # same tenant, still under budget at admission
    await plugin.on_request(ctx)
    await plugin.on_response(finish(ctx, 600, 0))  # now $0.012 spent
    with pytest.raises(QuotaExceededError) as e:
        await plugin.on_request(make_ctx("carol"))
    err = e.value
    assert (err.status, err.code, err.type) == (429, "insufficient_quota", "insufficient_quota")
    assert err.headers["retry-after"] == str(12 * 3600)
    assert "daily budget" in err.message and "2026-01-02T00:00:00Z" in err.message
    await plugin.on_request(make_ctx("dave", tenant="other"))  # other tenants unaffected
    clock.advance(12 * 3600)
    await plugin.on_request(make_ctx("carol"))  # a new UTC day


@pytest.mark.anyio
async def test_a_request_answered_after_midnight_is_spent_on_the_new_day() -> None:
    # (The memory store keeps each plan's period keys while they hold: the settlement must
    # still find the day it ends in, not the one it was admitted in.)
    clock = Clock()
    clock.advance(86400 - 10)  # 23:59:50 UTC
    plugin = make_plugin(clock, rules=[{"scope": "tenant", "budget_usd": {"day": 0.01}}])
    ctx = make_ctx()
    await plugin.on_request(ctx)
    clock.advance(20)  # answered at 00:00:10: $0.012 spent on the new day
    await plugin.on_response(finish(ctx, 1200, 0))
    with pytest.raises(QuotaExceededError, match="daily budget") as e:
        await plugin.on_request(make_ctx("bob"))
    assert "2026-01-03T00:00:00Z" in e.value.message
    clock.advance(86400)
    await plugin.on_request(make_ctx("bob"))


@pytest.mark.anyio
async def test_monthly_budget_uses_the_deployment_price_and_resets_next_month() -> None:
    clock = Clock()
    plugin = make_plugin(clock, rules=[{"scope": "user", "budget_usd": {"month": 0.02}}])
    ctx = make_ctx()
    await plugin.on_request(ctx)
    ctx.deployment = None  # no route plugin: the model's first deployment prices it
    await plugin.on_response(finish(ctx, 0, 1000))  # 1000 * $20/M = $0.02
    with pytest.raises(QuotaExceededError, match="monthly budget"):
        await plugin.on_request(make_ctx())
    clock.advance(30 * 86400)  # Jan 31: still January
    with pytest.raises(QuotaExceededError):
        await plugin.on_request(make_ctx())
    clock.advance(86400)  # Feb 1
    await plugin.on_request(make_ctx())


@pytest.mark.anyio
async def test_budget_holds_the_worst_case_cost_of_requests_in_flight() -> None:
    """A burst cannot spend a budget many times over: each admitted request holds what its
    answer may cost at most (prompt bound and completion cap at the model's highest prices)
    until its real cost is known; while the holds fill the budget, requests get a short 429."""
    plugin = make_plugin(rules=[{"scope": "tenant", "budget_usd": {"day": 1.0}}])
    # Each: 11 prompt bytes at $10/M + 10,000 completion tokens at $20/M = $0.20011 at most.
    burst = [make_ctx(f"u{i}", max_tokens=10_000) for i in range(10)]
    admitted, refused = [], []
    for c in burst:
        try:
            await plugin.on_request(c)
            admitted.append(c)
        except RateLimitError as e:
            refused.append(e)
    assert len(admitted) == 5  # held $0, 0.2, 0.4, 0.6, 0.8 at their admission: under $1
    err = refused[0]
    assert not isinstance(err, QuotaExceededError)  # not spent: wait for requests to end
    assert err.status == 429 and err.headers["retry-after"] == "1"
    assert "held by requests in flight" in err.message
    # One ends having cost $0.0201: its hold makes way for its real cost.
    await plugin.on_response(finish(admitted[0], 10, 1000))
    await plugin.on_request(make_ctx("late", max_tokens=10_000))
    with pytest.raises(RateLimitError, match="held by requests in flight"):
        await plugin.on_request(make_ctx("later", max_tokens=10_000))
    # One fails upstream (no usage, no cost): its whole hold comes back.
    await plugin.on_response(finish(admitted[1], status=502, usage=False))
    await plugin.on_request(make_ctx("after", max_tokens=10_000))


def test_format_duration_matches_openai() -> None:
    assert [format_duration(s) for s in (0, 0.02, 1, 8.64, 59.9996, 60, 360, 3723.5)] == [
        "0s", "20ms", "1s", "8.64s", "1m0s", "1m0s", "6m0s", "1h2m3.5s",
    ]  # fmt: skip


@pytest.mark.anyio
async def test_budget_holds_price_the_fallbacks_and_routing_targets_too() -> None:
    """A request for a cheap model may be served by its pricier fallback, or moved by a
    routing rule: its hold must cover the priciest deployment it may end up on."""
    from types import SimpleNamespace

    from gateway.catalogue import Catalogue, Deployment, ModelEntry, Price

    def model(name: str, price: float, fallbacks: tuple[str, ...] = ()) -> ModelEntry:
        dep = Deployment(id=f"{name}-d", model=f"{name}-up", base_url="http://127.0.0.1:9/v1",
                         price=Price(input_per_mtok=price, output_per_mtok=price))  # fmt: skip
        return ModelEntry(name=name, deployments=(dep,), fallbacks=fallbacks)

    catalogue = Catalogue((
        model("demo", 1, ("backup",)), model("backup", 5, ("last",)), model("last", 50),
        model("ruled", 500), model("other", 2000), model("pinned", 9000),
    ))  # fmt: skip
    rules = [SimpleNamespace(model="ruled", deployments=()),
             SimpleNamespace(model=None, deployments=("pinned-d",))]  # fmt: skip
    route = SimpleNamespace(name="route", config=SimpleNamespace(rules=rules))
    gateway = SimpleNamespace(catalogue=catalogue, pipeline=SimpleNamespace(find=lambda n: route))
    plugin = make_plugin(rules=[{"scope": "tenant", "budget_usd": {"day": 1.0}}])
    await plugin.startup(gateway)  # type: ignore[arg-type]
    entry = catalogue.get("demo")
    assert entry is not None
    served = {d.id for d in plugin.prices.may_serve(entry)}
    assert served == {"demo-d", "backup-d", "last-d", "ruled-d", "pinned-d"}  # not "other"
    ctx = make_ctx(max_tokens=100)
    ctx.model_entry = entry
    ctx.prompt_tokens_estimate = 0
    # 100 completion tokens at the priciest one ($9000/M): $0.9 held, whatever serves it.
    assert plugin.reservation(ctx, plugin.plan(ctx)) == (0, pytest.approx(0.9))
    # Without a route plugin, the fallbacks alone.
    plain = make_plugin(rules=[{"scope": "tenant", "budget_usd": {"day": 1.0}}])
    await plain.startup(SimpleNamespace(catalogue=catalogue,  # type: ignore[arg-type]
                                        pipeline=SimpleNamespace(find=lambda n: None)))  # fmt: skip
    assert {d.id for d in plain.prices.may_serve(entry)} == {"demo-d", "backup-d", "last-d"}


# --- refusals: headers and the longest wait ---------------------------------------------------


@pytest.mark.anyio
async def test_a_request_too_large_carries_the_request_and_token_headers() -> None:
    plugin = make_plugin(rules=[{"scope": "user", "rpm": 5, "tpm": 1000}])
    first = make_ctx()
    await plugin.on_request(first)
    reserved = first.log["limit"]["reserved_tokens"]
    big = make_ctx(max_tokens=5000)
    with pytest.raises(RateLimitError, match="Request too large") as e:
        await plugin.on_request(big)
    assert "retry-after" not in e.value.headers
    h = big.response_headers
    assert (h["x-ratelimit-limit-requests"], h["x-ratelimit-remaining-requests"]) == ("5", "4")
    assert (h["x-ratelimit-limit-tokens"], h["x-ratelimit-remaining-tokens"]) == (
        "1000", str(1000 - reserved))  # fmt: skip
    assert h["x-ratelimit-reset-tokens"].endswith("s")


@pytest.mark.anyio
async def test_retry_after_is_the_longest_wait_of_the_failing_limits() -> None:
    """The tenant's window frees a request in 49 s, the user's in 59 s: waiting 49 s (what
    Retry-After used to say, from the first failing rule) would be refused again."""
    clock = Clock()
    plugin = make_plugin(clock, rules=[{"scope": "tenant", "rpm": 2}, {"scope": "user", "rpm": 1}])
    await plugin.on_request(make_ctx("bob"))
    clock.advance(10)
    await plugin.on_request(make_ctx("alice"))
    clock.advance(1)
    with pytest.raises(RateLimitError, match="scope user") as e:
        await plugin.on_request(make_ctx("alice"))
    assert e.value.headers["retry-after"] == "59"
    clock.advance(49)  # the tenant's limit passes, the user's not yet
    with pytest.raises(RateLimitError, match="scope user"):
        await plugin.on_request(make_ctx("alice"))
    clock.advance(10)
    await plugin.on_request(make_ctx("alice"))


@pytest.mark.anyio
async def test_a_spent_budget_outweighs_a_request_limit() -> None:
    clock = Clock(1_767_225_600.0 + 23 * 3600)  # 23:00 UTC
    plugin = make_plugin(
        clock, rules=[{"scope": "user", "rpm": 1}, {"scope": "tenant", "budget_usd": {"day": 0.01}}]
    )
    ctx = make_ctx()
    await plugin.on_request(ctx)
    await plugin.on_response(finish(ctx, 1000, 0))  # $0.01: spent
    clock.advance(1)
    with pytest.raises(QuotaExceededError) as e:  # not the request limit's 59 s
        await plugin.on_request(make_ctx())
    assert e.value.headers["retry-after"] == "3599"
