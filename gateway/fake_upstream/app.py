"""Assembling the fake: ``create_app`` for any server, ``start`` for tests in one event loop."""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from gateway.fake_upstream.openai_api import chat_completions, embeddings, models
from gateway.fake_upstream.state import (
    STATE,
    Behaviour,
    FakeState,
    check_overrides,
    clear_requests,
    clear_stats,
    get_requests,
    get_stats,
)


def create_app(
    behaviours: Mapping[str, Mapping[str, Any]] | None = None, record: int = 100, **defaults: Any
) -> web.Application:
    """The fake's app.

    ``defaults`` are ``Behaviour`` fields (``chunks=5, delay_ms=10``...), ``behaviours`` maps an
    upstream model name to overrides, ``record`` bounds the request log (0 turns it off).
    Unknown or invalid fields raise ``ValueError``.
    """
    base = Behaviour(**check_overrides(defaults, "create_app"))
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[STATE] = FakeState(base, behaviours or {}, record)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/_fake/requests", get_requests)
    app.router.add_delete("/_fake/requests", clear_requests)
    app.router.add_get("/_fake/stats", get_stats)
    app.router.add_delete("/_fake/stats", clear_stats)
    # The Anthropic Messages API lives in its own module and adds its routes here. find_spec,
    # not try/except ImportError, so a broken fake_anthropic fails loudly instead of vanishing.
    if importlib.util.find_spec("gateway.fake_anthropic") is not None:
        importlib.import_module("gateway.fake_anthropic").register(app)
    return app


async def start(host: str = "127.0.0.1", port: int = 0, **kwargs: Any) -> tuple[web.AppRunner, int]:
    """Serve ``create_app(**kwargs)`` in this event loop; ``await runner.cleanup()`` stops it."""
    # handler_cancellation: a client disconnect cancels the handler at once (even mid-hang),
    # which is what the ``*_cancelled`` counters measure.
    runner = web.AppRunner(create_app(**kwargs), handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    return runner, int(runner.addresses[0][1])
