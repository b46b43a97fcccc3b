"""Where cached answers live: a bounded in-process LRU, or Redis shared by every replica.

Both stores hold opaque bytes with a TTL. A Redis outage is a cache miss (and no store), never
an error for the client: the cache is an optimisation, the upstream is the source of truth.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable

from prometheus_client import Counter
from redis.exceptions import RedisError

from gateway.redis_client import redis_client

log = logging.getLogger("gateway.cache")

STORE_ERRORS = Counter(
    "gateway_cache_store_errors_total",
    "Cache operations that could not use Redis (down or slow), by operation.",
    ["op"],
)


class MemoryStore:
    """LRU bounded by entry count and total bytes; expired entries are dropped when read."""

    def __init__(
        self, max_entries: int, max_bytes: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.clock = clock
        self.bytes = 0
        self._data: OrderedDict[str, tuple[float, bytes]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._data)

    async def get(self, key: str) -> bytes | None:
        item = self._data.get(key)
        if item is None:
            return None
        expires, value = item
        if expires <= self.clock():
            self._drop(key)
            return None
        self._data.move_to_end(key)
        return value

    async def set(self, key: str, value: bytes, ttl_s: float) -> None:
        if len(value) > self.max_bytes:
            return
        if key in self._data:
            self._drop(key)
        self._data[key] = (self.clock() + ttl_s, value)
        self.bytes += len(value)
        while len(self._data) > self.max_entries or self.bytes > self.max_bytes:
            oldest = next(iter(self._data))
            self._drop(oldest)

    def _drop(self, key: str) -> None:
        _, value = self._data.pop(key)
        self.bytes -= len(value)

    async def close(self) -> None:
        self._data.clear()
        self.bytes = 0


class RedisStore:
    """``GET``/``SET PX`` under ``<prefix>:``; after an error, Redis is skipped for a while so a
    down or hung Redis costs at most one timeout per ``retry_after_s``."""

    def __init__(self, url: str, prefix: str, timeout_s: float, retry_after_s: float) -> None:
        self.prefix = prefix
        self.retry_after_s = retry_after_s
        self._skip_until = 0.0
        self.client = redis_client(url, timeout_s)

    def _available(self) -> bool:
        return time.monotonic() >= self._skip_until

    def _failed(self, op: str, err: Exception) -> None:
        STORE_ERRORS.labels(op).inc()
        self._skip_until = time.monotonic() + self.retry_after_s
        log.warning("cache store unavailable", extra={"op": op, "error": type(err).__name__})

    async def get(self, key: str) -> bytes | None:
        if not self._available():
            return None
        try:
            value = await self.client.get(f"{self.prefix}:{key}")
        except (RedisError, OSError) as err:
            self._failed("get", err)
            return None
        return value if isinstance(value, bytes) else None

    async def set(self, key: str, value: bytes, ttl_s: float) -> None:
        if not self._available():
            return
        try:
            await self.client.set(f"{self.prefix}:{key}", value, px=max(1, int(ttl_s * 1000)))
        except (RedisError, OSError) as err:
            self._failed("set", err)

    async def ping(self) -> None:
        await self.client.ping()

    async def close(self) -> None:
        await self.client.aclose()
