"""limit plugin: the hot path's spelt-out forms against the general ones they stand for."""

from __future__ import annotations

import random

from gateway.catalogue import Deployment, Price
from gateway.context import Usage
from plugins.limit import LimitConfig, scopes
from plugins.limit.headers import add_rate_limit_headers, format_duration
from plugins.limit.prices import HoldPrices
from plugins.limit.store_memory import MemoryStore

from .test_limit_helpers import make_ctx, make_plugin


def _go_duration(seconds: float) -> str:
    """format_duration as first written: every part formatted."""
    ms = round(seconds * 1000)
    if ms <= 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    whole, frac = divmod(ms, 1000)
    tail = f".{frac:03d}".rstrip("0") + "s" if frac else "s"
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}{tail}"
    return f"{minutes}m{secs}{tail}" if minutes else f"{secs}{tail}"


def test_format_duration_by_table_is_the_go_formatting() -> None:
    rng = random.Random(7)
    values = [n / 1000 for n in range(-3, 130_000, 7)] + [
        rng.uniform(0, 10**6) for _ in range(20_000)
    ]
    values += [edge + d for edge in (0.9995, 59.9995, 3599.9995) for d in (-1e-9, 0.0, 1e-9)]
    assert [format_duration(s) for s in values] == [_go_duration(s) for s in values]


def test_hold_prices_cost_is_the_price_s_own() -> None:
    rng = random.Random(3)
    prices = HoldPrices()
    for _ in range(2000):
        dep = Deployment(model="m", base_url="http://127.0.0.1:9/v1", price=Price(
            input_per_mtok=rng.choice([0.0, 0.15, 3.0, 10.0]), output_per_mtok=rng.uniform(0, 90),
            cached_input_per_mtok=rng.choice([None, 0.0, 0.3]),
            cache_write_per_mtok=rng.choice([None, 3.75, 50.0])))  # fmt: skip
        prompt = rng.randint(0, 100_000)
        cached = rng.randint(0, prompt)
        write = rng.randint(0, prompt - cached)
        write_1h = rng.randint(0, write)
        usage = Usage(prompt, rng.randint(0, 9000), cached_tokens=cached)
        usage.cache_write_tokens, usage.cache_write_1h_tokens = write, write_1h
        assert prices.cost(dep, usage) == dep.price.cost_of(usage)


def _rule(rng: random.Random) -> dict[str, object]:
    rule = {
        "scope": rng.choice(["user", "tenant", "global"]),
        "rpm": rng.choice([None, 2, 3, 50]),
        "tpm": rng.choice([None, 900, 10**6]),
        "max_parallel": rng.choice([None, 2, 9]),
    }
    return {k: v for k, v in rule.items() if v is not None}


def test_an_admission_s_headers_are_those_of_its_state() -> None:
    """The memory store writes an admission's x-ratelimit-* headers from its counters: they
    are the headers of the limits' state read back, the tightest limit of each kind named."""
    rng = random.Random(11)
    for _ in range(300):
        rules = [_rule(rng) for _ in range(rng.randint(1, 3))]
        rules = [r for r in rules if len(r) > 1] or [{"scope": "user", "rpm": 5}]
        plan = scopes.plan(LimitConfig.model_validate({"rules": rules}), make_ctx())
        store, now = MemoryStore(), 1_767_225_600.0
        for i in range(12):
            now += rng.random() * 20
            written: dict[str, str] = {}
            taken = store.admit_now(plan, now, f"s{i}", rng.randint(1, 400), 60.0, 0.0, written)
            state = store.peek_now(plan, now)
            expected: dict[str, str] = {}
            add_rate_limit_headers(expected, state.requests, state.tokens)
            if not isinstance(taken, type(state)):  # admitted
                assert list(written.items()) == list(expected.items()), (rules, i)


def test_the_last_plan_is_reused_only_for_the_same_caller_and_model() -> None:
    plugin = make_plugin(rules=[{"scope": "user", "model": "demo", "rpm": 1},
                                {"scope": "tenant", "rpm": 5}])  # fmt: skip
    first = make_ctx("alice")
    plan = plugin.plan(first)
    again = make_ctx("alice")
    again.identity = first.identity  # one object per API key
    assert plugin.plan(again) is plan
    other = make_ctx("alice", model="other")
    other.identity, other.model, other.model_entry = first.identity, "other", None
    assert [c.scope for c in plugin.plan(other).rpm] == ["tenant"]
    anonymous = make_ctx(None)
    assert [c.key for c in plugin.plan(anonymous).rpm] != [c.key for c in plan.rpm]
    assert plugin.plan(again) is plan
