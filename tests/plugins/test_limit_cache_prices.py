"""limit plugin: budgets settle at the prompt cache's prices and hold at the highest one."""

from __future__ import annotations

import pytest

from gateway.catalogue import Deployment, ModelEntry, Price
from gateway.context import Usage
from gateway.errors import QuotaExceededError

from .test_limit_helpers import make_ctx, make_plugin

ENTRY = ModelEntry(name="demo", deployments=(Deployment(
    model="demo-upstream", base_url="http://127.0.0.1:9/v1",
    price=Price(input_per_mtok=10.0, output_per_mtok=20.0, cached_input_per_mtok=1.0,
                cache_write_per_mtok=50.0)),))  # fmt: skip


@pytest.mark.anyio
async def test_a_budget_is_spent_at_the_cached_price() -> None:
    plugin = make_plugin(rules=[{"scope": "tenant", "budget_usd": {"day": 0.01}}])
    for user in ("a", "b"):
        ctx = make_ctx(user, max_tokens=10)
        ctx.model_entry = ENTRY
        await plugin.on_request(ctx)
        ctx.status = 200
        # 1000 prompt tokens, 900 from the cache: 100 x $10 + 900 x $1 per million = $0.0019
        # (at the plain input price it would be $0.01: the whole budget).
        ctx.usage = Usage(1000, 0, cached_tokens=900)
        await plugin.on_response(ctx)
    ctx = make_ctx("c", max_tokens=10)
    ctx.model_entry = ENTRY
    await plugin.on_request(ctx)  # $0.0038 spent
    ctx.status, ctx.usage = 200, Usage(1000, 0, cache_write_tokens=1000)  # $0.05
    await plugin.on_response(ctx)
    late = make_ctx("d", max_tokens=10)
    late.model_entry = ENTRY
    with pytest.raises(QuotaExceededError):
        await plugin.on_request(late)


def test_a_hold_prices_the_prompt_at_the_highest_input_price() -> None:
    """A prompt may be all cache writes: the worst case charges the cache-write price when it
    is above the plain input price."""
    plugin = make_plugin(rules=[{"scope": "tenant", "budget_usd": {"day": 1.0}}])
    ctx = make_ctx(max_tokens=100)
    ctx.model_entry = ENTRY
    ctx.prompt_tokens_estimate = 1000
    held = (1000 * 50 + 100 * 20) / 1e6
    assert plugin.reservation(ctx, plugin.plan(ctx)) == (0, pytest.approx(held))
