"""Admin HTTP routes for RAG documents: what ``gateway rag`` does, over HTTP.

    GET    /admin/rag/collections                       collections, chunk and tenant counts
    GET    /admin/rag/{collection}/documents[?tenant=]  documents (sources) in a collection
    POST   /admin/rag/{collection}/documents            upload (JSON batch, or one raw file)
    DELETE /admin/rag/{collection}/documents?tenant=T[&source=S]   one document, or T's part
    DELETE /admin/rag/{collection}                      the whole collection, every tenant

Every handler first authorizes the caller through the ``auth`` plugin as an ``admin`` route and
fails closed (403) when the pipeline has no auth plugin, so mounting these routes never opens an
unauthenticated write path. Upload bodies:

* ``application/json``: ``{"tenant": "acme", "meta": {...}, "documents": [{"name": "faq.md",
  "content": "...", "meta": {...}}]}`` (``content_base64`` instead of ``content`` for PDF);
* anything else: the raw file, with ``?name=faq.md&tenant=acme&meta=team=sales``; the
  Content-Type (text/plain, text/markdown, text/html, application/pdf) or the name's extension
  says how to read it, and its ``charset`` how to decode it (UTF-8 without one; an unknown
  charset, or bytes not valid in it, fail that document).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import logging
from typing import TYPE_CHECKING, Any

import orjson
from starlette.responses import Response
from starlette.routing import Route

from gateway.context import Identity
from gateway.errors import (
    GatewayError,
    InvalidRequestError,
    PayloadTooLargeError,
    PermissionDeniedError,
    ServiceUnavailableError,
)
from gateway.proxy import new_context
from gateway.responses import error_response, private_json
from plugins.rag.config import check_collection
from plugins.rag.loaders import UnsupportedDocument, charset_of, kind_for
from plugins.rag.store import StoreError

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from starlette.requests import Request

    from plugins.rag.plugin import RagPlugin

log = logging.getLogger("gateway.rag")
_UPLOAD_TIMEOUT_S = 600.0


async def _authorize(plugin: RagPlugin, request: Request) -> Identity:
    gateway = plugin.gateway
    auth = gateway.pipeline.find("auth") if gateway is not None else None
    if auth is None:
        raise PermissionDeniedError("RAG admin routes need the auth plugin in the pipeline")
    ctx = new_context(request.scope, "admin")
    await auth.on_request(ctx)
    if ctx.identity is None:
        raise PermissionDeniedError("this route requires an admin role")
    return ctx.identity


def _guarded(
    plugin: RagPlugin, handler: Callable[[RagPlugin, Request, Identity], Awaitable[Response]]
) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        try:
            identity = await _authorize(plugin, request)
            if plugin.store is None or plugin.ingestor is None:
                raise ServiceUnavailableError("the rag plugin is not started")
            return await handler(plugin, request, identity)
        except GatewayError as err:
            return error_response(err)
        except StoreError as e:
            log.warning("rag_admin_store_error", extra={"error": str(e)})
            return error_response(ServiceUnavailableError("the vector store is unavailable"))
        except TimeoutError:
            return error_response(
                ServiceUnavailableError("the vector store did not answer in time")
            )

    return endpoint


def _collection(request: Request) -> str:
    try:
        return check_collection(request.path_params["collection"])
    except ValueError as e:
        raise InvalidRequestError(str(e), param="collection") from None


async def _body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLargeError(f"upload larger than {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLargeError(f"upload larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _query_meta(request: Request) -> dict[str, str]:
    meta: dict[str, str] = {}
    for pair in request.query_params.getlist("meta"):
        key, sep, value = pair.partition("=")
        if not sep:
            raise InvalidRequestError("meta must be key=value", param="meta")
        meta[key] = value
    return meta


def _documents(request: Request, raw: bytes) -> tuple[str | None, list[dict[str, Any]]]:
    """(tenant, documents) where each document has name, data, kind, meta."""
    full_ctype = request.headers.get("content-type", "")
    ctype = full_ctype.split(";")[0].strip().lower()
    if ctype == "application/json":
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise InvalidRequestError("body is not valid JSON") from None
        if not isinstance(body, dict) or not isinstance(body.get("documents"), list):
            raise InvalidRequestError('expected {"documents": [...]}', param="documents")
        common = body.get("meta") or {}
        if not isinstance(common, dict):
            raise InvalidRequestError("meta must be an object", param="meta")
        docs = []
        for i, d in enumerate(body["documents"]):
            where = f"documents[{i}]"
            if not isinstance(d, dict) or not isinstance(d.get("name"), str) or not d["name"]:
                raise InvalidRequestError(f"{where}.name is required", param=f"{where}.name")
            content_type = str(d.get("content_type") or "")
            # ``content`` is JSON text, sent on as UTF-8 whatever charset content_type names;
            # ``content_base64`` is raw bytes, read with content_type's charset.
            charset = ""
            if isinstance(d.get("content"), str):
                try:
                    data = d["content"].encode()
                except UnicodeEncodeError:
                    raise InvalidRequestError(
                        f"{where}.content is not valid Unicode", param=f"{where}.content"
                    ) from None
            elif isinstance(d.get("content_base64"), str):
                try:
                    data = base64.b64decode(d["content_base64"], validate=True)
                except (binascii.Error, ValueError):
                    raise InvalidRequestError(
                        f"{where}.content_base64 is not base64", param=f"{where}.content_base64"
                    ) from None
                charset = charset_of(content_type)
            else:
                raise InvalidRequestError(f"{where}.content is required", param=f"{where}.content")
            meta = d.get("meta") or {}
            if not isinstance(meta, dict):
                raise InvalidRequestError(f"{where}.meta must be an object", param=f"{where}.meta")
            docs.append({"name": d["name"], "data": data, "kind": "",
                         "content_type": content_type, "charset": charset,
                         "meta": {**common, **meta}})  # fmt: skip
        tenant = body.get("tenant")
        if tenant is not None and not isinstance(tenant, str):
            raise InvalidRequestError("tenant must be a string", param="tenant")
        return tenant, docs
    name = request.query_params.get("name")
    if not name:
        raise InvalidRequestError("a raw upload needs ?name=", param="name")
    doc = {"name": name, "data": raw, "kind": "", "content_type": ctype,
           "charset": charset_of(full_ctype), "meta": _query_meta(request)}  # fmt: skip
    return request.query_params.get("tenant"), [doc]


async def list_collections(plugin: RagPlugin, request: Request, _: Identity) -> Response:
    assert plugin.store is not None
    rows = await plugin.run_store(plugin.store.list_collections, limit_s=30)
    return private_json({"object": "list", "data": [dataclasses.asdict(r) for r in rows]})


async def list_documents(plugin: RagPlugin, request: Request, _: Identity) -> Response:
    assert plugin.store is not None
    collection = _collection(request)
    tenant = request.query_params.get("tenant") or None
    rows = await plugin.run_store(plugin.store.list_sources, collection, tenant, limit_s=30)
    return private_json({"object": "list", "collection": collection,
                  "data": [dataclasses.asdict(r) for r in rows]})  # fmt: skip


async def upload(plugin: RagPlugin, request: Request, actor: Identity) -> Response:
    assert plugin.ingestor is not None
    collection = _collection(request)
    raw = await _body(request, plugin.config.max_upload_bytes)
    tenant, docs = _documents(request, raw)
    tenant = tenant or actor.tenant
    results = []
    for doc in docs:
        try:
            kind = kind_for(doc["name"], doc["content_type"])
            result = await plugin.run_store(
                partial_ingest(plugin, collection, tenant, doc, kind), limit_s=_UPLOAD_TIMEOUT_S
            )
            results.append(dataclasses.asdict(result))
        except (UnsupportedDocument, ValueError) as e:
            results.append({"source": doc["name"], "status": "error", "chunks": 0, "error": str(e)})
    log.info(
        "rag_upload",
        extra={"actor": actor.user, "collection": collection, "tenant": tenant,
               "documents": [(r["source"], r["status"]) for r in results]},
    )  # fmt: skip
    body: dict[str, Any] = {"collection": collection, "tenant": tenant, "results": results}
    if results and all(r["status"] == "error" for r in results):
        # Nothing was ingested: a client error, in the OpenAI shape every 4xx has (with the
        # per-document results beside it).
        first = results[0]
        body = {
            "error": {
                "message": f"no document was ingested ({len(results)} failed; "
                f"{first['source']}: {first['error']})",
                "type": "invalid_request_error",
                "param": "documents",
                "code": "ingest_failed",
            },
            **body,
        }
        return private_json(body, status=400)
    return private_json(body)


def partial_ingest(plugin: RagPlugin, collection: str, tenant: str, doc: dict[str, Any],
                   kind: str) -> Callable[[], Any]:  # fmt: skip
    assert plugin.ingestor is not None
    ingestor = plugin.ingestor

    def run() -> Any:
        return ingestor.ingest_bytes(collection, tenant, doc["name"], doc["data"], kind=kind,
                                     meta=doc["meta"], charset=doc.get("charset", ""))  # fmt: skip

    return run


async def delete_documents(plugin: RagPlugin, request: Request, actor: Identity) -> Response:
    assert plugin.store is not None
    collection = _collection(request)
    tenant = request.query_params.get("tenant")
    if not tenant:
        raise InvalidRequestError("?tenant= is required", param="tenant")
    source = request.query_params.get("source") or None
    n = await plugin.run_store(plugin.store.delete, collection, tenant, source, limit_s=60)
    log.info("rag_delete", extra={"actor": actor.user, "collection": collection,
                                  "tenant": tenant, "source": source, "chunks": n})  # fmt: skip
    return private_json(
        {"collection": collection, "tenant": tenant, "source": source, "deleted": n}
    )


async def delete_collection(plugin: RagPlugin, request: Request, actor: Identity) -> Response:
    assert plugin.store is not None
    collection = _collection(request)
    n = await plugin.run_store(plugin.store.delete, collection, limit_s=60)
    log.info("rag_delete_collection",
             extra={"actor": actor.user, "collection": collection, "chunks": n})  # fmt: skip
    return private_json({"collection": collection, "deleted": n})


def admin_routes(plugin: RagPlugin) -> list[Route]:
    """The routes; each authorizes through the auth plugin (admin role) before anything else."""

    async def documents(request: Request) -> Response:
        handler = {"GET": list_documents, "POST": upload}.get(request.method, delete_documents)
        return await _guarded(plugin, handler)(request)

    return [
        Route("/admin/rag/collections", _guarded(plugin, list_collections), methods=["GET"]),
        Route("/admin/rag/{collection}/documents", documents, methods=["GET", "POST", "DELETE"]),
        Route("/admin/rag/{collection}", _guarded(plugin, delete_collection), methods=["DELETE"]),
    ]
