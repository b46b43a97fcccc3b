"""Concurrency slot ids: unique even when clients reuse a request id."""

from __future__ import annotations

import pytest

from gateway.errors import RateLimitError

from .test_limit_helpers import finish, make_ctx, make_plugin


@pytest.mark.anyio
async def test_a_reused_request_id_takes_and_frees_its_own_slot() -> None:
    plugin = make_plugin(rules=[{"scope": "user", "max_parallel": 2}])
    a, b = make_ctx(), make_ctx()
    a.request_id = b.request_id = "client-chosen"
    await plugin.on_request(a)
    await plugin.on_request(b)
    ids = {ctx.scratch["limit"]["reservation"].slot_id for ctx in (a, b)}
    assert len(ids) == 2 and all(i.startswith("client-chosen.") for i in ids)
    with pytest.raises(RateLimitError):
        await plugin.on_request(make_ctx())
    await plugin.on_response(finish(a))  # frees a's slot only
    await plugin.on_request(make_ctx())
    with pytest.raises(RateLimitError):
        await plugin.on_request(make_ctx())


@pytest.mark.anyio
async def test_every_worker_draws_its_own_slot_prefix() -> None:
    plugin = make_plugin(rules=[{"scope": "user", "max_parallel": 10}])
    first = plugin._slot_prefix
    await plugin.startup()
    assert plugin._slot_prefix != first and len(plugin._slot_prefix) == 8
