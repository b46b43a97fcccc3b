"""The Redis key store (keys created and revoked at runtime, shared by replicas) and its cache.

Layout under ``prefix`` (default ``gw:keys:``)::

    <prefix>d:<hex digest>  -> JSON record (the key itself is never stored)
    <prefix>ids             -> hash: key id -> hex digest (unique ids, listing)
    <prefix>audit           -> list of JSON change events, newest first (capped)
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any

import orjson
import redis.asyncio as aioredis

from gateway.redis_client import redis_client
from plugins.auth.keys import KeyRecord

_AUDIT_MAX = 1000


def _text(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else v


class TTLCache:
    """A small LRU with a time-to-live, holding hits and misses (``None``) alike.

    Caching misses keeps a flood of random keys from turning into a flood of Redis reads.
    """

    def __init__(self, size: int, ttl_s: float) -> None:
        self.size = size
        self.ttl_s = ttl_s
        self._data: OrderedDict[bytes, tuple[float, KeyRecord | None]] = OrderedDict()

    def get(self, digest: bytes) -> tuple[bool, KeyRecord | None]:
        item = self._data.get(digest)
        if item is None:
            return False, None
        if item[0] < time.monotonic():
            del self._data[digest]
            return False, None
        self._data.move_to_end(digest)
        return True, item[1]

    def put(self, digest: bytes, record: KeyRecord | None) -> None:
        if self.ttl_s <= 0:
            return
        self._data[digest] = (time.monotonic() + self.ttl_s, record)
        self._data.move_to_end(digest)
        while len(self._data) > self.size:
            self._data.popitem(last=False)

    def forget(self, digest: bytes) -> None:
        self._data.pop(digest, None)

    def clear(self) -> None:
        self._data.clear()


class KeyConflictError(Exception):
    """A key with this id already exists."""


class RedisKeyStore:
    def __init__(self, url: str, prefix: str) -> None:
        self.prefix = prefix
        self.redis: aioredis.Redis = redis_client(url, 2.0)

    def _rec_key(self, digest_hex: str) -> str:
        return f"{self.prefix}d:{digest_hex}"

    @property
    def _ids(self) -> str:
        return f"{self.prefix}ids"

    @property
    def audit_key(self) -> str:
        return f"{self.prefix}audit"

    async def ping(self) -> None:
        await self.redis.ping()

    async def get(self, digest: bytes) -> KeyRecord | None:
        raw = await self.redis.get(self._rec_key(digest.hex()))
        if raw is None:
            return None
        return KeyRecord.from_json(orjson.loads(raw))

    async def create(self, record: KeyRecord) -> None:
        """Store a new key; raises :class:`KeyConflictError` when the id is taken."""
        digest_hex = record.digest.hex()
        # HSETNX claims the id atomically, so two replicas creating the same id cannot both win.
        if not await self.redis.hsetnx(self._ids, record.id, digest_hex):
            raise KeyConflictError(record.id)
        await self.redis.set(self._rec_key(digest_hex), orjson.dumps(record.to_json()))

    async def get_by_id(self, key_id: str) -> KeyRecord | None:
        digest_hex = await self.redis.hget(self._ids, key_id)
        if digest_hex is None:
            return None
        return await self.get(bytes.fromhex(_text(digest_hex)))

    async def delete(self, key_id: str) -> KeyRecord | None:
        digest_hex = await self.redis.hget(self._ids, key_id)
        if digest_hex is None:
            return None
        record = await self.get(bytes.fromhex(_text(digest_hex)))
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(self._rec_key(_text(digest_hex)))
            pipe.hdel(self._ids, key_id)
            await pipe.execute()
        return record

    async def list(self) -> list[KeyRecord]:
        ids = await self.redis.hgetall(self._ids)
        if not ids:
            return []
        raws = await self.redis.mget([self._rec_key(_text(d)) for d in ids.values()])
        records = [KeyRecord.from_json(orjson.loads(r)) for r in raws if r is not None]
        return sorted(records, key=lambda r: r.id)

    async def audit(self, event: dict[str, Any]) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.lpush(self.audit_key, orjson.dumps(event))
            pipe.ltrim(self.audit_key, 0, _AUDIT_MAX - 1)
            await pipe.execute()

    async def close(self) -> None:
        await self.redis.aclose()
