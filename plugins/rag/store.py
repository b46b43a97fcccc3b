"""The vector store: Chroma, embedded (a local directory) or a Chroma server (several replicas).

Every method is synchronous (Chroma's client is); the plugin calls them on a small thread pool
under a timeout, so a store that hangs never holds a request. Every chunk carries its tenant in
its metadata, and every read path ANDs the tenant on top (``filters.with_tenant``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from chromadb.api.types import Documents, EmbeddingFunction, Embeddings
from chromadb.utils.embedding_functions import register_embedding_function

from plugins.rag.config import StoreConfig
from plugins.rag.embed import Embedder
from plugins.rag.filters import with_tenant

log = logging.getLogger("gateway.rag")

#: Metadata keys the gateway owns; ``--meta`` may not set them.
RESERVED = frozenset(
    {"tenant", "source", "title", "headings", "mtime", "content_hash", "chunk", "n_chunks", "kind"}
)


class StoreError(Exception):
    """The vector store could not answer (down, slow, or refused the call)."""


@dataclass(slots=True)
class Hit:
    id: str
    text: str
    metadata: dict[str, Any]
    #: Cosine similarity, 1.0 = same direction.
    score: float
    embedding: list[float] | None = None
    #: Score after re-ranking (starts as ``score``).
    rank_score: float = 0.0


@dataclass(slots=True)
class SourceInfo:
    source: str
    tenant: str
    title: str
    chunks: int
    mtime: float
    content_hash: str
    meta: dict[str, Any] = field(default_factory=dict)


@register_embedding_function  # so Chroma can read back the collection's configuration
class GatewayEmbeddingFunction(EmbeddingFunction[Documents]):
    """Our embedder in Chroma's shape, so Chroma never builds its default (downloading) one.

    Vectors are passed explicitly on every add and query; this is only what Chroma keeps on the
    collection object.
    """

    def __init__(self, embedder: Embedder) -> None:
        self._embedder = embedder

    def __call__(self, input: Documents) -> Embeddings:
        import numpy as np

        return [np.asarray(v, dtype=np.float32) for v in self._embedder.embed(list(input))]

    @staticmethod
    def name() -> str:
        return "gateway-sentence-transformer"

    def get_config(self) -> dict[str, Any]:
        return {"model": self._embedder.model_name}

    @staticmethod
    def build_from_config(config: dict[str, Any]) -> GatewayEmbeddingFunction:
        return GatewayEmbeddingFunction(Embedder(str(config.get("model", "all-MiniLM-L6-v2"))))

    def default_space(self) -> Any:
        return "cosine"

    def supported_spaces(self) -> Any:
        return ["cosine"]

    @staticmethod
    def validate_config(config: dict[str, Any]) -> None:
        return None

    def validate_config_update(
        self, old_config: dict[str, Any], new_config: dict[str, Any]
    ) -> None:
        return None


class VectorStore:
    def __init__(self, config: StoreConfig, embedder: Embedder, timeout_s: float = 5.0) -> None:
        self.config = config
        self.embedder = embedder
        self.timeout_s = timeout_s
        self._ef = GatewayEmbeddingFunction(embedder)
        self._client: Any = None
        self._collections: dict[str, Any] = {}
        self._lock = threading.Lock()

    @property
    def where(self) -> str:
        return self.config.url or self.config.path

    # -- connection ---------------------------------------------------------------------------

    def client(self) -> Any:
        with self._lock:
            if self._client is None:
                self._client = self._connect()
            return self._client

    def _connect(self) -> Any:
        import chromadb
        from chromadb.config import Settings

        settings = Settings(anonymized_telemetry=False)
        try:
            if self.config.url:
                parts = urlsplit(self.config.url)
                client = chromadb.HttpClient(
                    host=parts.hostname or "127.0.0.1",
                    port=parts.port or (443 if parts.scheme == "https" else 8000),
                    ssl=parts.scheme == "https",
                    settings=settings,
                )
                _bound_http_timeout(client, self.timeout_s)
            else:
                client = chromadb.PersistentClient(path=self.config.path, settings=settings)
        except Exception as e:
            raise StoreError(f"cannot reach the vector store at {self.where}: {e}") from e
        return client

    def close(self) -> None:
        """Release our reference to Chroma's shared system (its sockets go with the last one)."""
        with self._lock:
            client, self._client = self._client, None
            self._collections.clear()
        if client is None:
            return
        sessions = [
            getattr(getattr(c, "_server", None), "_session", None)
            for c in (client, getattr(client, "_admin_client", None))
        ]
        try:
            client.close()
            # Chroma stops the shared system with its last client but leaves the HTTP clients
            # of server mode open: close them then, and only then (other clients may share them).
            from chromadb.api.shared_system_client import SharedSystemClient

            if client._identifier not in SharedSystemClient._identifier_to_system:
                for session in sessions:
                    if session is not None:
                        session.close()
        except Exception as e:  # closing must never fail a shutdown
            log.warning("rag_store_close_failed", extra={"error": str(e)})

    def _reset(self) -> None:
        with self._lock:
            self._collections.clear()

    def collection(self, name: str, create: bool = False) -> Any | None:
        cached = self._collections.get(name)
        if cached is not None:
            return cached
        client = self.client()
        try:
            if create:
                cfg = self.config
                coll = client.get_or_create_collection(
                    name,
                    embedding_function=self._ef,
                    configuration={
                        "hnsw": {
                            "space": "cosine",
                            "max_neighbors": cfg.hnsw_max_neighbors,
                            "ef_construction": cfg.hnsw_ef_construction,
                            "ef_search": cfg.hnsw_ef_search,
                        }
                    },
                )
            else:
                coll = client.get_collection(name, embedding_function=self._ef)
        except Exception as e:
            if not create and _is_not_found(e):
                return None
            raise StoreError(f"vector store error on collection {name!r}: {e}") from e
        self._collections[name] = coll
        return coll

    def _call(self, name: str, fn: Any) -> Any:
        try:
            return fn()
        except Exception as e:
            # A stale handle (collection deleted by another replica) must not stick.
            self._reset()
            raise StoreError(f"vector store error on collection {name!r}: {e}") from e

    # -- reads --------------------------------------------------------------------------------

    def query(
        self,
        name: str,
        embedding: Sequence[float],
        n: int,
        tenant: str,
        where: dict[str, Any] | None = None,
        with_embeddings: bool = False,
    ) -> list[Hit]:
        coll = self.collection(name)
        if coll is None:
            return []
        include = ["documents", "metadatas", "distances"]
        if with_embeddings:
            include.append("embeddings")
        res = self._call(
            name,
            lambda: coll.query(
                query_embeddings=[list(embedding)],
                n_results=n,
                where=with_tenant(tenant, where),
                include=include,
            ),
        )
        hits: list[Hit] = []
        embs = res.get("embeddings")
        for i, cid in enumerate(res["ids"][0]):
            meta = dict(res["metadatas"][0][i] or {})
            if meta.get("tenant") != tenant:  # defence in depth: never trust the filter alone
                log.error("rag_tenant_mismatch", extra={"collection": name, "chunk": cid})
                continue
            score = 1.0 - float(res["distances"][0][i])
            emb = [float(x) for x in embs[0][i]] if embs is not None else None
            hits.append(Hit(cid, res["documents"][0][i] or "", meta, score, emb, score))
        return hits

    def source_hash(self, name: str, tenant: str, source: str) -> str | None:
        """The content hash of an ingested source, or None when it is not there."""
        coll = self.collection(name)
        if coll is None:
            return None
        res = self._call(
            name,
            lambda: coll.get(
                where=with_tenant(tenant, {"source": {"$eq": source}}),
                include=["metadatas"],
                limit=1,
            ),
        )
        metas = res.get("metadatas") or []
        return str(metas[0].get("content_hash")) if metas else None

    def list_collections(self) -> list[tuple[str, int]]:
        client = self.client()
        out = []
        try:
            for c in client.list_collections():
                name = c if isinstance(c, str) else c.name
                out.append((name, client.get_collection(name, embedding_function=self._ef).count()))
        except Exception as e:
            raise StoreError(f"vector store error listing collections: {e}") from e
        return sorted(out)

    def list_sources(self, name: str, tenant: str | None = None) -> list[SourceInfo]:
        coll = self.collection(name)
        if coll is None:
            return []
        where = with_tenant(tenant) if tenant else None
        found: dict[tuple[str, str], SourceInfo] = {}
        offset, page = 0, 1000
        while True:
            res = self._call(
                name,
                lambda o=offset: coll.get(where=where, include=["metadatas"], limit=page, offset=o),
            )
            metas = res.get("metadatas") or []
            for m in metas:
                key = (str(m.get("tenant")), str(m.get("source")))
                info = found.get(key)
                if info is None:
                    extra = {k: v for k, v in m.items() if k not in RESERVED}
                    info = found[key] = SourceInfo(
                        source=key[1], tenant=key[0], title=str(m.get("title", "")), chunks=0,
                        mtime=float(m.get("mtime", 0.0)),
                        content_hash=str(m.get("content_hash", "")), meta=extra,
                    )  # fmt: skip
                info.chunks += 1
            if len(metas) < page:
                break
            offset += page
        return sorted(found.values(), key=lambda s: (s.tenant, s.source))

    # -- writes -------------------------------------------------------------------------------

    def replace_source(
        self,
        name: str,
        tenant: str,
        source: str,
        ids: list[str],
        documents: list[str],
        embeddings: list[list[float]],
        metadatas: list[dict[str, Any]],
    ) -> None:
        coll = self.collection(name, create=True)
        assert coll is not None  # create=True returns a collection or raises
        self._call(
            name, lambda: coll.delete(where=with_tenant(tenant, {"source": {"$eq": source}}))
        )
        for start in range(0, len(ids), 1000):
            end = start + 1000
            self._call(
                name,
                lambda s=start, e=end: coll.add(
                    ids=ids[s:e],
                    documents=documents[s:e],
                    embeddings=embeddings[s:e],
                    metadatas=metadatas[s:e],
                ),
            )

    def delete(self, name: str, tenant: str | None = None, source: str | None = None) -> int:
        """Delete a source, a tenant's chunks, or (neither given) the whole collection."""
        coll = self.collection(name)
        if coll is None:
            return 0
        if tenant is None and source is None:
            count = int(self._call(name, coll.count))
            self._call(name, lambda: self.client().delete_collection(name))
            self._reset()
            return count
        if tenant is None:
            raise ValueError("deleting a source needs its tenant")
        where = with_tenant(tenant, {"source": {"$eq": source}} if source else None)
        ids = self._call(name, lambda: coll.get(where=where, include=[]))["ids"]
        if ids:
            self._call(name, lambda: coll.delete(ids=ids))
        return len(ids)


def _is_not_found(e: Exception) -> bool:
    text = f"{type(e).__name__} {e}".lower()
    return "notfound" in text or "does not exist" in text or "not found" in text


def _bound_http_timeout(client: Any, timeout_s: float) -> None:
    """Chroma's HTTP client waits forever by default; bound it (best effort, private field)."""
    import httpx

    session = getattr(getattr(client, "_server", None), "_session", None)
    if isinstance(session, httpx.Client):
        session.timeout = httpx.Timeout(timeout_s)
