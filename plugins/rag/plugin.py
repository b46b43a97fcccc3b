"""``rag``: retrieves context from a vector store and injects it into chat requests.

Retrieval happens when the model asked for is listed under ``models`` in the config, or the
request carries ``"rag": {...}`` / ``"use_rag": true`` (the ``openai`` SDK sends them with
``extra_body``). Only the caller's tenant's own collection is searched. Retrieved
chunks are re-ranked, scanned for indirect prompt injection, fitted into the model's context
window and injected as one system message with numbered sources; the client learns which
sources were used from the ``x-gateway-rag-sources`` header (on an upstream's answer only, set
when the attempt succeeds) and a ``rag_sources`` body field.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from gateway.errors import GatewayError, InvalidRequestError, ServiceUnavailableError
from gateway.plugin import Plugin, StartupError
from gateway.tokens import message_text
from plugins.rag import context as ctxbuild
from plugins.rag.config import RagConfig
from plugins.rag.embed import Embedder
from plugins.rag.filters import sanitize
from plugins.rag.ingest import Ingestor
from plugins.rag.rerank import rerank
from plugins.rag.store import Hit, StoreError, VectorStore

if TYPE_CHECKING:
    from gateway.catalogue import Deployment
    from gateway.context import RequestContext
    from gateway.state import Gateway

log = logging.getLogger("gateway.rag")
T = TypeVar("T")

HEADER = "x-gateway-rag-sources"
_REQUEST_KEYS = frozenset({"collection", "top_k", "filter"})


class RetrievalError(Exception):
    """Retrieval failed (store down, timeout, scanner failure): ``on_error`` decides."""


class RagPlugin(Plugin):
    name = "rag"
    Config = RagConfig
    endpoints: ClassVar[frozenset[str]] = frozenset({"chat"})
    config: RagConfig

    def __init__(self, config: RagConfig) -> None:
        super().__init__(config)
        # Operator filters are checked once, here, so a typo fails at startup.
        self._model_filters = {
            name: sanitize(m.filter, reject_tenant=True)[0] for name, m in config.models.items()
        }
        self.embedder: Embedder | None = None
        self.store: VectorStore | None = None
        self.ingestor: Ingestor | None = None
        self.scanner: Any = None
        self.gateway: Gateway | None = None
        self._guard: Any = None
        self._executor: ThreadPoolExecutor | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    async def startup(self, gateway: Gateway | None) -> None:
        cfg = self.config
        self.gateway = gateway
        # One torch thread: the server shares its cores with request handling.
        self.embedder = Embedder(
            cfg.embedding_model, cfg.embedding_batch, threads=1, cache_size=cfg.query_cache
        )
        self.store = VectorStore(cfg.store, self.embedder, timeout_s=max(cfg.timeout_s, 5.0))
        self.ingestor = Ingestor(self.store, self.embedder, cfg.chunk)
        self._executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="rag-store")
        await self.embedder.aload()
        self.scanner = self._find_scanner(gateway)
        try:
            await self.run_store(self.store.client, limit_s=max(cfg.timeout_s, 5.0))
            self._warn_legacy(
                await self.run_store(self.store.legacy_collections, limit_s=max(cfg.timeout_s, 5.0))
            )
        except (StoreError, TimeoutError) as e:
            # A store that is down now may be up by the first request; on_error decides then.
            log.warning("rag_store_unavailable", extra={"store": self.store.where, "error": str(e)})
        log.info(
            "rag_ready",
            extra={"store": self.store.where, "scanner": type(self.scanner).__name__
                   if self.scanner is not None else None},
        )  # fmt: skip

    def _warn_legacy(self, legacy: list[str]) -> None:
        """Collections of the old all-tenants layout are not searched: say so at startup."""
        cfg = self.config
        named = {
            cfg.default_collection,
            *cfg.collections,
            *(m.collection for m in cfg.models.values()),
        }
        for name in sorted(named.intersection(legacy)):
            log.warning(
                "rag_legacy_collection",
                extra={"collection": name,
                       "fix": f"gateway rag migrate --collection {name} (gateway stopped)"},
            )  # fmt: skip

    def routes(self) -> list[Any]:
        """The admin routes (``/admin/rag/...``); the app mounts them, each checks admin role."""
        from plugins.rag.admin import admin_routes

        return admin_routes(self)

    def _find_scanner(self, gateway: Gateway | None) -> Any:
        """The guard plugin (its ``.scanner`` is read per request: its startup may swap in the
        semantic one after ours ran), else our own rules-only guard scanner, else None."""
        if self.config.scan == "off":
            return None
        guard = gateway.pipeline.find("guard") if gateway is not None else None
        if guard is not None and callable(getattr(getattr(guard, "scanner", None),
                                                  "scan_chunks", None)):  # fmt: skip
            self._guard = guard
            return getattr(guard, "scanner", None)
        try:
            # No guard in the pipeline: the guard's default rules still catch the classic
            # injection phrasings in documents (no semantic model: that needs its startup).
            from plugins.guard import GuardPlugin

            scanner = GuardPlugin(GuardPlugin.Config.model_validate({})).scanner
            if not callable(getattr(scanner, "scan_chunks", None)):
                raise TypeError("the guard's scanner has no scan_chunks()")
            return scanner
        except Exception as e:
            if self.config.scan == "required":
                raise StartupError(
                    "rag: scan is 'required' but no guard scanner is available "
                    f"(add the guard plugin to the pipeline): {e}"
                ) from e
            log.warning("rag_chunks_not_scanned", extra={"reason": str(e)})
            return None

    @property
    def active_scanner(self) -> Any:
        if self._guard is not None:
            return getattr(self._guard, "scanner", None)
        return self.scanner

    async def shutdown(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        if self.embedder is not None:
            self.embedder.close()
        if self.store is not None:
            self.store.close()

    async def run_store(self, fn: Any, *args: Any, limit_s: float | None = None) -> Any:
        """Run a blocking store call on the store threads, bounded by ``limit_s`` seconds."""
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(self._executor, partial(fn, *args))
        if limit_s is None:
            return await fut
        return await asyncio.wait_for(fut, limit_s)

    # -- request ------------------------------------------------------------------------------

    def _spec(self, ctx: RequestContext) -> dict[str, Any] | None:
        """What to retrieve for this request (None: nothing), from the model and the body."""
        raw = ctx.body.pop("rag", None)
        use = ctx.body.pop("use_rag", None)
        if use is not None and not isinstance(use, bool):
            raise InvalidRequestError("'use_rag' must be a boolean", param="use_rag")
        if raw is not None and not isinstance(raw, (dict, bool)):
            raise InvalidRequestError("'rag' must be an object or a boolean", param="rag")
        req: dict[str, Any] = raw if isinstance(raw, dict) else {}
        unknown = set(req) - _REQUEST_KEYS
        if unknown:
            raise InvalidRequestError(
                f"unknown key {sorted(unknown)[0]!r} in 'rag'; allowed: "
                f"{', '.join(sorted(_REQUEST_KEYS))}",
                param="rag",
            )
        names = [ctx.model]
        if ctx.model_entry is not None:
            names.append(ctx.model_entry.name)
        model_name = next((n for n in names if n in self.config.models), None)
        asked = bool(req) or raw is True or use is True
        if model_name is None and not asked:
            return None
        model = self.config.models.get(model_name) if model_name else None
        collection = (
            req["collection"]
            if "collection" in req
            else (model.collection if model else self.config.default_collection)
        )
        if not isinstance(collection, str) or not collection:
            raise InvalidRequestError("'rag.collection' must be a string", param="rag.collection")
        if self.config.collections and collection not in self.config.collections:
            raise InvalidRequestError(
                f"collection {collection!r} is not available", param="rag.collection",
                code="rag_collection_not_allowed",
            )  # fmt: skip
        top_k = (
            req["top_k"]
            if "top_k" in req
            else (model.top_k if model and model.top_k else self.config.top_k)
        )
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise InvalidRequestError("'rag.top_k' must be a positive integer", param="rag.top_k")
        top_k = min(top_k, self.config.max_top_k)
        client_filter, dropped = sanitize(
            req.get("filter"), reject_tenant=self.config.tenant_filter == "reject"
        )
        if dropped:
            log.warning(
                "rag_tenant_filter_ignored",
                extra={"request_id": ctx.request_id, "keys": dropped},
            )
        filters = [f for f in (self._model_filters.get(model_name or ""), client_filter) if f]
        where: dict[str, Any] | None = None
        if filters:
            where = filters[0] if len(filters) == 1 else {"$and": filters}
        return {"collection": collection, "top_k": top_k, "where": where}

    async def on_request(self, ctx: RequestContext) -> None:
        spec = self._spec(ctx)
        if spec is None:
            return None
        query = _last_user_text(ctx.body.get("messages") or [])
        if not query.strip():
            return None
        tenant = ctx.identity.tenant if ctx.identity is not None else "default"
        started = time.perf_counter()
        info: dict[str, Any] = {"collection": spec["collection"], "tenant": tenant}
        ctx.log["rag"] = info
        try:
            hits, flagged = await asyncio.wait_for(
                self._retrieve(query, tenant, spec), self.config.timeout_s
            )
        except (RetrievalError, StoreError, TimeoutError) as e:
            reason = "timeout" if isinstance(e, TimeoutError) else str(e)
            info.update(error=reason, ms=round((time.perf_counter() - started) * 1000, 1))
            log.warning(
                "rag_retrieval_failed",
                extra={"request_id": ctx.request_id, "error": reason,
                       "on_error": self.config.on_error},
            )  # fmt: skip
            if self.config.on_error == "fail":
                raise ServiceUnavailableError(
                    "retrieval is unavailable right now; try again later",
                    code="rag_unavailable",
                ) from None
            return None
        selected = ctxbuild.select(ctx, hits, self.config.max_context_tokens)
        info.update(
            retrieved=len(hits) + len(flagged), flagged=len(flagged), used=len(selected),
            ms=round((time.perf_counter() - started) * 1000, 1),
        )  # fmt: skip
        if flagged:
            info["flagged_ids"] = [h.id for h in flagged]
            log.warning(
                "rag_chunks_flagged",
                extra={"request_id": ctx.request_id, "chunks": [h.id for h in flagged],
                       "sources": sorted({str(h.metadata.get("source")) for h in flagged})},
            )  # fmt: skip
        if not selected:
            return None
        ctxbuild.inject(ctx, ctxbuild.message(selected))
        srcs = ctxbuild.sources(selected, spec["collection"])
        ctx.scratch_for(self.name)["sources"] = srcs
        ctx.log["rag_sources"] = [f"{s['source']}#{s['chunk']}" for s in srcs]
        return None

    async def _retrieve(
        self, query: str, tenant: str, spec: dict[str, Any]
    ) -> tuple[list[Hit], list[Hit]]:
        assert self.embedder is not None and self.store is not None
        cfg = self.config
        top_k: int = spec["top_k"]
        vector = await self.embedder.aembed_query(query, tenant)
        n = top_k if cfg.rerank.method == "none" else max(20, top_k * cfg.rerank.candidates)
        hits: list[Hit] = await self.run_store(
            self.store.query, spec["collection"], vector, n, tenant, spec["where"],
            cfg.rerank.method == "mmr",
        )  # fmt: skip
        hits = [h for h in hits if h.score >= cfg.min_score]
        hits = rerank(cfg.rerank.method, query, hits, top_k, cfg.rerank.alpha)[:top_k]
        if not hits or self.active_scanner is None:
            return hits, []
        # What reaches the model is the chunk's label (title, headings, file name: text from
        # the document too) and its text: scan both, as one.
        verdicts = await self._scan([f"{ctxbuild.describe(h)}\n{h.text}" for h in hits])
        kept = [h for h, v in zip(hits, verdicts, strict=True) if not flagged(v)]
        dropped = [h for h, v in zip(hits, verdicts, strict=True) if flagged(v)]
        return kept, dropped

    async def _scan(self, texts: list[str]) -> list[Any]:
        try:
            fn = self.active_scanner.scan_chunks
            if inspect.iscoroutinefunction(fn):
                verdicts = await fn(texts)
            else:
                loop = asyncio.get_running_loop()
                verdicts = await loop.run_in_executor(self._executor, fn, texts)
            verdicts = list(verdicts)
        except Exception as e:
            # Unscanned chunks never reach the model: this counts as a failed retrieval.
            raise RetrievalError(f"chunk scan failed: {e}") from e
        if len(verdicts) != len(texts):
            raise RetrievalError("chunk scan returned the wrong number of verdicts")
        return verdicts

    async def on_attempt(
        self,
        ctx: RequestContext,
        deployment: Deployment,
        error: GatewayError | None,
        elapsed_s: float,
    ) -> None:
        """The header goes out with an upstream's answer only: an error response (a later
        plugin's 400, a context_length_exceeded, every deployment failing) sent nothing to a
        model, so it names no sources."""
        srcs = ctx.scratch_for(self.name).get("sources")
        if not srcs:
            return
        if error is None:
            ctx.response_headers[HEADER] = ctxbuild.header_value(srcs)
        else:
            ctx.response_headers.pop(HEADER, None)

    async def on_response(self, ctx: RequestContext) -> None:
        srcs = ctx.scratch_for(self.name).get("sources")
        if srcs and isinstance(ctx.response, dict):
            ctx.response["rag_sources"] = srcs


def flagged(verdict: Any) -> bool:
    """Whether the guard's verdict says the chunk is an injection (unknown shapes fail closed)."""
    if isinstance(verdict, bool):
        return verdict
    for attr in ("flagged", "blocked", "is_injection", "injection"):
        value = getattr(verdict, attr, None)
        if isinstance(value, bool):
            return value
    action = getattr(verdict, "action", None)
    if isinstance(action, str):
        return action.lower() not in ("allow", "pass", "ok", "none", "clean")
    if isinstance(verdict, dict):
        return flagged(type("V", (), verdict)())
    return True


def _last_user_text(messages: list[dict[str, Any]]) -> str:
    for msg in reversed(messages):
        if isinstance(msg, dict) and msg.get("role") == "user":
            return message_text(msg.get("content"))
    return ""
