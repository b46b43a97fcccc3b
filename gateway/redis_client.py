"""The Redis client the stores share the shape of (limits, cache, API keys).

redis-py's default pool holds at most 100 connections and raises ``MaxConnectionsError`` at
once on the 101st concurrent command: a burst of requests on a healthy Redis then looked like
an outage (the limit store switched to ``on_store_error`` for a second: limits off, or 503s).
A blocking pool makes a command wait for a free connection instead; the callers' own timeouts
bound that wait.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from gateway.redact import url_for_logs

#: Connections per store and process; commands beyond them wait for one.
MAX_CONNECTIONS = 256


def redis_client(url: str, timeout_s: float, *, decode_responses: bool = False) -> Any:
    """A client for ``url``: socket and connect timeouts ``timeout_s``, no retries inside the
    client (a dead Redis costs one timeout, not several), and a pool that waits up to
    ``timeout_s`` for a free connection."""
    try:
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=MAX_CONNECTIONS,
            timeout=timeout_s,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
            decode_responses=decode_responses,
            health_check_interval=0,
        )
    except ValueError:
        # The parser's message quotes what it took for the port: a password holding "/".
        raise ValueError(
            f"invalid Redis URL {url_for_logs(url)} (percent-encode '/', '?', '#' and '@' in "
            "its password)"
        ) from None
    return aioredis.Redis.from_pool(pool)  # (closing the client closes the pool too)
