"""``cache``: answer repeated deterministic chat requests from a cache, per tenant.

A request is cacheable when it asks for a reproducible answer (``temperature: 0`` or a
``seed``). Its key is the tenant plus a hash of the canonical body (sorted JSON of model,
messages, tools, parameters, stream mode), so answers never cross tenants. A hit is answered
here (the upstream is never called), marked ``x-gateway-cache: hit`` and in the log, and costs
nothing: ``ctx.usage`` is zero, so limits and the ledger record no tokens.

Pipeline position matters: put ``cache`` after ``auth`` and ``limit`` (identity, rate limits
still apply to hits) and **before** ``guard``: response hooks run in reverse order, so the cache
then stores the answer as the output guard left it (redacted), and a replay can never bypass it.
Startup refuses a ``guard`` placed before ``cache``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, ClassVar

import orjson
from prometheus_client import Counter
from starlette.responses import Response, StreamingResponse

from gateway.config import ConfigError
from gateway.context import Usage
from gateway.headers import forwarded_headers
from gateway.plugin import Plugin

from .config import CacheConfig
from .keys import HeaderFilter, deterministic, prompt_text, request_key, shape_key
from .semantic import SemanticIndex, load_embedder
from .store import MemoryStore, RedisStore

if TYPE_CHECKING:
    from gateway.config import Settings
    from gateway.context import RequestContext
    from gateway.state import Gateway

log = logging.getLogger("gateway.cache")

LOOKUPS = Counter(
    "gateway_cache_lookups_total",
    "Cache lookups by result: hit, semantic_hit, miss, bypass (not cacheable).",
    ["result"],
)

_JSON, _SSE = b"J", b"S"
#: An answer with headers that describe it: ``H`` + their JSON + ``\n`` + the answer's JSON.
_JSON_HEADERS = b"H"
#: Response headers that describe the answer itself (set by plugins after the cache: RAG's
#: sources), so a hit gives them back; the rest (rate limits, request id) are the request's.
_ANSWER_HEADERS = ("x-gateway-rag-sources",)
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


class CachePlugin(Plugin):
    name = "cache"
    Config = CacheConfig
    endpoints: ClassVar[frozenset[str]] = frozenset({"chat"})
    config: CacheConfig

    def __init__(self, config: CacheConfig) -> None:
        super().__init__(config)
        self.store: MemoryStore | RedisStore | None = None
        self.semantic: SemanticIndex | None = None
        self._headers = HeaderFilter(config.ignore_headers)
        #: The route plugin's header that pins a deployment: such requests bypass the cache
        #: (they ask for one deployment's answer, and the route plugin decides who may).
        self._pin_header: str | None = None
        #: Whether the route plugin's rules pick deployments by the caller's tier / roles: then
        #: those are part of the key (a free caller must not get the pro tier's model's answer).
        self._vary_tier = False
        self._vary_roles = False
        #: The guard plugin after this one: a semantic hit answers a prompt that was never
        #: checked (only its near twin was), so it is checked here before being answered.
        self._guard: Plugin | None = None

    def check(self, settings: Settings, pipeline: list[str]) -> None:
        if "guard" in pipeline and pipeline.index("guard") < pipeline.index(self.name):
            raise ConfigError(
                f"{settings.source}: pipeline: 'cache' must come before 'guard' so that cached "
                "answers are the ones the output guard let through (and hits cannot bypass it)"
            )
        if "auth" in pipeline and pipeline.index("auth") > pipeline.index(self.name):
            raise ConfigError(
                f"{settings.source}: pipeline: 'cache' must come after 'auth': before it, a "
                "hit answers a caller whose role may not use the model, under another caller's "
                "tenant"
            )

    async def startup(self, gateway: Gateway | None) -> None:
        if gateway is not None:
            self.check(gateway.settings, [p.name for p in gateway.pipeline.plugins])
            names = [p.name for p in gateway.pipeline.plugins]
            for plugin in gateway.pipeline.plugins:
                pin = getattr(getattr(plugin, "config", None), "pin_header", None)
                if plugin.name == "route" and isinstance(pin, str):
                    self._pin_header = pin
                if plugin.name == "route":
                    rules = getattr(getattr(plugin, "config", None), "rules", ()) or ()
                    self._vary_tier = any(r.when.tiers for r in rules)
                    self._vary_roles = any(r.when.roles for r in rules)
                if plugin.name == "guard" and names.index("guard") > names.index(self.name):
                    self._guard = plugin
        cfg = self.config
        if cfg.store == "memory":
            self.store = MemoryStore(cfg.max_entries, cfg.max_memory_bytes)
        else:
            self.store = RedisStore(
                cfg.store, cfg.key_prefix, cfg.socket_timeout_s, cfg.retry_store_after_s
            )
            try:
                await self.store.ping()
            except Exception as err:  # a cache that starts cold is still a working gateway
                log.warning("cache store unreachable at startup", extra={"error": repr(err)})
        if cfg.semantic.enabled:
            embedder = load_embedder(cfg.semantic.model)
            self.semantic = SemanticIndex(
                embedder, cfg.semantic.threshold, cfg.semantic.max_entries_per_tenant,
                max_groups=cfg.max_entries,
            )  # fmt: skip

    async def shutdown(self) -> None:
        if self.semantic is not None:
            self.semantic.close()
        if self.store is not None:
            await self.store.close()

    # --- request ---------------------------------------------------------------------------

    def _bypass(self, ctx: RequestContext) -> None:
        LOOKUPS.labels("bypass").inc()
        ctx.response_headers["x-gateway-cache"] = "bypass"
        ctx.log["cache"] = "bypass"

    async def on_request(self, ctx: RequestContext) -> Response | None:
        assert self.store is not None, "startup() not run"
        body = ctx.body
        if (
            (ctx.stream and not self.config.cache_streams)
            or (self.config.deterministic_only and not deterministic(body))
            or (self._pin_header is not None and self._pin_header in ctx.headers)
        ):
            self._bypass(ctx)
            return None
        ident = ctx.identity
        tenant = ident.tenant if ident is not None else "default"
        if ident is not None and (self._vary_tier or self._vary_roles):
            if self._vary_tier:
                tenant += f"\0tier={ident.tier}"
            if self._vary_roles:
                tenant += "\0roles=" + ",".join(sorted(ident.roles))
        # The forwarded headers are part of the key: an upstream may act on them.
        vary = self._headers.key_headers(forwarded_headers(ctx.raw_headers))
        key = request_key(tenant, ctx.model, body, ctx.stream, vary)
        scratch = ctx.scratch_for(self.name)
        scratch["key"] = key
        value = await self.store.get(key)
        similarity: float | None = None
        if value is None and self.semantic is not None:
            text = prompt_text(body)
            vec = await self.semantic.embed(text) if text else None
            if vec is not None:  # (a question too long to embed whole: exact hits only)
                group = shape_key(tenant, ctx.model, body, ctx.stream, vary)
                scratch["vector"], scratch["group"] = vec, group
                found = self.semantic.lookup(group, vec)
                if found is not None:
                    value = await self.store.get(found[0])
                    similarity = found[1]
                    if value is not None and self._guard is not None:
                        # Raises (a 400) when the guard refuses this prompt.
                        await self._guard.on_request(ctx)
        if value is None or value[:1] not in (_JSON, _SSE, _JSON_HEADERS):
            LOOKUPS.labels("miss").inc()
            ctx.response_headers["x-gateway-cache"] = "miss"
            ctx.log["cache"] = "miss"
            return None
        scratch["hit"] = True
        LOOKUPS.labels("hit" if similarity is None else "semantic_hit").inc()
        ctx.response_headers["x-gateway-cache"] = "hit"
        ctx.response_headers["x-gateway-model"] = ctx.model
        ctx.log["cache"] = "hit"
        if similarity is not None:
            ctx.log["cache_similarity"] = round(similarity, 4)
        # A hit costs nothing: limits reconcile their reservation to zero, the ledger records 0.
        ctx.usage = Usage(0, 0)
        ctx.finished = time.perf_counter()
        if value[:1] == _JSON_HEADERS:
            headers, _, value = value[1:].partition(b"\n")
            ctx.response_headers.update(orjson.loads(headers))
            value = _JSON + value
        if value[:1] == _JSON:
            ctx.response = orjson.loads(value[1:])
            return Response(value[1:], media_type="application/json")
        entry = orjson.loads(value[1:])
        headers = entry.get("headers")
        if isinstance(headers, dict):
            ctx.response_headers.update(headers)
        return self._replay(ctx, entry)

    def _replay(self, ctx: RequestContext, entry: dict[str, Any]) -> StreamingResponse:
        chunks: list[Any] = entry.get("chunks") or []
        usage = entry.get("usage")
        opts = ctx.body.get("stream_options")
        has_usage = any(isinstance(c, dict) and c.get("usage") for c in chunks)
        if (
            isinstance(opts, dict)
            and opts.get("include_usage")
            and isinstance(usage, dict)
            and not has_usage  # (some upstreams put it in their last content chunk, stored)
        ):
            last = chunks[-1] if chunks else {}
            chunks = [*chunks, {
                "id": last.get("id", ""), "object": "chat.completion.chunk",
                "created": last.get("created", 0), "model": last.get("model", ""),
                "choices": [], "usage": usage,
            }]  # fmt: skip

        async def events() -> AsyncIterator[bytes]:
            for chunk in chunks:
                yield b"data: " + orjson.dumps(chunk) + b"\n\n"
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)

    # --- response --------------------------------------------------------------------------

    async def on_chunk(self, ctx: RequestContext, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        scratch = ctx.scratch.get(self.name)
        if scratch is not None and "key" in scratch and not scratch.get("too_big"):
            # Serialised now: plugins above this one may still change the dict.
            data = orjson.dumps(chunk)
            size = scratch.get("size", 0) + len(data)
            if size > self.config.max_entry_bytes:
                scratch["too_big"] = True
                scratch.pop("chunks", None)
            else:
                scratch["size"] = size
                scratch.setdefault("chunks", []).append(data)
        return [chunk]

    async def on_response(self, ctx: RequestContext) -> None:
        scratch = ctx.scratch.get(self.name)
        if not scratch or "key" not in scratch or scratch.get("hit") or self.store is None:
            return
        if ctx.status != 200 or ctx.error_type or ctx.client_disconnected:
            return
        sent = ctx.response_headers
        headers = {name: sent[name] for name in _ANSWER_HEADERS if name in sent}
        if ctx.stream:
            if scratch.get("too_big") or not scratch.get("chunks"):
                return
            usage = None
            if ctx.usage is not None and not ctx.usage.estimated:
                usage = {
                    "prompt_tokens": ctx.usage.prompt_tokens,
                    "completion_tokens": ctx.usage.completion_tokens,
                    "total_tokens": ctx.usage.total_tokens,
                }
            value = _SSE + b'{"chunks":[' + b",".join(scratch["chunks"]) + b"],"
            value += b'"usage":' + orjson.dumps(usage)
            if headers:
                value += b',"headers":' + orjson.dumps(headers)
            value += b"}"
        else:
            if ctx.response is None or not ctx.response.get("choices"):
                return  # (an upstream's 200 holding an error object is no answer to keep)
            if headers:
                value = _JSON_HEADERS + orjson.dumps(headers) + b"\n" + orjson.dumps(ctx.response)
            else:
                value = _JSON + orjson.dumps(ctx.response)
        if len(value) > self.config.max_entry_bytes:
            return
        await self.store.set(scratch["key"], value, self.config.ttl_s)
        if self.semantic is not None and "vector" in scratch:
            self.semantic.add(scratch["group"], scratch["key"], scratch["vector"])
