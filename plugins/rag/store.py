"""The vector store: Chroma, embedded (a local directory) or a Chroma server (several replicas).

Every method is synchronous (Chroma's client is); the plugin calls them on a small thread pool
under a timeout, so a store that hangs never holds a request.

Layout: a *collection* (what configs, requests, the CLI and the admin routes name) is stored as
one Chroma collection per tenant, named by ``physical_name(collection, tenant)`` and marked with
both in its metadata. Retrieval opens the caller's tenant's collection only, so no request
filter can reach another tenant's chunks, and the query needs no tenant condition: Chroma's
metadata pre-filter costs 30-70 ms on 10,000 chunks, the unfiltered search 2-4 ms. Every chunk
still carries its tenant in its metadata; the query path re-checks it on every hit, and the
management paths (ingest, list, delete) still AND it into their ``where``.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from plugins.rag.chroma import GatewayEmbeddingFunction, close_client, connect, is_not_found
from plugins.rag.config import StoreConfig
from plugins.rag.embed import Embedder
from plugins.rag.filters import with_tenant

log = logging.getLogger("gateway.rag")

#: Metadata keys the gateway owns; ``--meta`` may not set them.
RESERVED = frozenset(
    {"tenant", "source", "title", "headings", "mtime", "content_hash", "chunk", "n_chunks", "kind"}
)


#: Chunks per Chroma ``get`` when paging through a collection.
PAGE_SIZE = 1000
#: Collection metadata naming what a physical collection holds.
META_COLLECTION = "rag_collection"
META_TENANT = "rag_tenant"


def physical_name(collection: str, tenant: str) -> str:
    """The Chroma collection holding ``tenant``'s chunks of ``collection``.

    ``<collection>__t_<20 hex digits of sha256(collection, tenant)>``: valid for Chroma (3-63
    characters of ``[A-Za-z0-9._-]``, alphanumeric at both ends) whatever the tenant holds
    (``@``, ``:``), unique per (collection, tenant), and still readable by its prefix. The
    collection's metadata says which pair it holds and is checked whenever it is opened.
    """
    digest = hashlib.sha256(f"{collection}\0{tenant}".encode()).hexdigest()[:20]
    return f"{collection[:39]}__t_{digest}"


@dataclass(slots=True)
class CollectionInfo:
    collection: str
    chunks: int
    tenants: int
    #: An old single collection holding every tenant (``gateway rag migrate`` converts it);
    #: retrieval does not read it.
    legacy: bool = False


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
        try:
            return connect(self.config, self.timeout_s)
        except Exception as e:
            raise StoreError(f"cannot reach the vector store at {self.where}: {e}") from e

    def close(self) -> None:
        """Release our reference to Chroma's shared system (its sockets go with the last one)."""
        with self._lock:
            client, self._client = self._client, None
            self._collections.clear()
        if client is not None:
            close_client(client)

    def _forget(self, physical: str) -> None:
        """Drop a cached handle (its collection may have been deleted by another process)."""
        with self._lock:
            self._collections.pop(physical, None)

    def collection(self, name: str, tenant: str, create: bool = False) -> Any | None:
        """``tenant``'s part of collection ``name``; None when it does not exist (and not
        ``create``). Raises ``StoreError`` if the Chroma collection belongs to another pair."""
        physical = physical_name(name, tenant)
        cached = self._collections.get(physical)
        if cached is not None:
            return cached
        client = self.client()
        try:
            if create:
                cfg = self.config
                coll = client.get_or_create_collection(
                    physical,
                    embedding_function=self._ef,
                    metadata={META_COLLECTION: name, META_TENANT: tenant},
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
                coll = client.get_collection(physical, embedding_function=self._ef)
        except Exception as e:
            if not create and is_not_found(e):
                return None
            raise StoreError(f"vector store error on collection {name!r}: {e}") from e
        meta = coll.metadata or {}
        if meta.get(META_COLLECTION) != name or meta.get(META_TENANT) != tenant:
            # Only a hash collision or a hand-made collection can get here: never serve it.
            raise StoreError(
                f"Chroma collection {physical!r} is not collection {name!r} of tenant {tenant!r}"
            )
        with self._lock:
            self._collections[physical] = coll
        return coll

    def call(self, name: str, tenant: str | None, fn: Any) -> Any:
        try:
            return fn()
        except Exception as e:
            # A stale handle (collection deleted by another replica) must not stick.
            if tenant is not None:
                self._forget(physical_name(name, tenant))
            raise StoreError(f"vector store error on collection {name!r}: {e}") from e

    def _scan(self) -> list[tuple[str, str | None, Any]]:
        """``(collection, tenant, Chroma collection)`` for every Chroma collection; tenant None
        for one without our metadata (an old all-tenants collection, or not the gateway's)."""
        try:
            listed = self.client().list_collections()
        except Exception as e:
            raise StoreError(f"vector store error listing collections: {e}") from e
        out: list[tuple[str, str | None, Any]] = []
        for c in listed:
            meta = c.metadata or {}
            name, tenant = meta.get(META_COLLECTION), meta.get(META_TENANT)
            if isinstance(name, str) and isinstance(tenant, str):
                out.append((name, tenant, c))
            else:
                out.append((c.name, None, c))
        return out

    @staticmethod
    def _count(coll: Any) -> int | None:
        """Chunks in a Chroma collection; None when it vanished meanwhile."""
        try:
            return int(coll.count())
        except Exception as e:
            if is_not_found(e):
                return None
            raise StoreError(f"vector store error counting {coll.name!r}: {e}") from e

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
        """The ``n`` nearest chunks of ``tenant``'s part of ``name``. ``where`` is the request's
        filter only: the collection is the tenant boundary (see the module docstring)."""
        include = ["documents", "metadatas", "distances"]
        if with_embeddings:
            include.append("embeddings")
        res: Any = None
        for attempt in (1, 2):
            coll = self.collection(name, tenant)
            if coll is None:
                return []
            try:
                res = coll.query(
                    query_embeddings=[list(embedding)], n_results=n, where=where, include=include
                )
                break
            except Exception as e:
                self._forget(physical_name(name, tenant))
                # Deleted and re-created by another process since we opened it: reopen once.
                if attempt == 2 or not is_not_found(e):
                    raise StoreError(f"vector store error on collection {name!r}: {e}") from e
        hits: list[Hit] = []
        embs = res.get("embeddings")
        for i, cid in enumerate(res["ids"][0]):
            meta = dict(res["metadatas"][0][i] or {})
            if meta.get("tenant") != tenant:  # defence in depth: never trust the layout alone
                log.error("rag_tenant_mismatch", extra={"collection": name, "chunk": cid})
                continue
            score = 1.0 - float(res["distances"][0][i])
            emb = list(map(float, embs[0][i])) if embs is not None else None
            hits.append(Hit(cid, res["documents"][0][i] or "", meta, score, emb, score))
        return hits

    def source_hash(self, name: str, tenant: str, source: str) -> str | None:
        """The content hash of an ingested source, or None when it is not there."""
        coll = self.collection(name, tenant)
        if coll is None:
            return None
        res = self.call(
            name,
            tenant,
            lambda: coll.get(
                where=with_tenant(tenant, {"source": {"$eq": source}}),
                include=["metadatas"],
                limit=1,
            ),
        )
        metas = res.get("metadatas") or []
        return str(metas[0].get("content_hash")) if metas else None

    def list_collections(self) -> list[CollectionInfo]:
        """Collections with their chunk and tenant counts (old all-tenant ones flagged)."""
        found: dict[tuple[str, bool], CollectionInfo] = {}
        for name, tenant, coll in self._scan():
            count = self._count(coll)
            if count is None:
                continue
            legacy = tenant is None
            info = found.setdefault((name, legacy), CollectionInfo(name, 0, 0, legacy))
            info.chunks += count
            info.tenants += not legacy
        return sorted(found.values(), key=lambda c: (c.collection, c.legacy))

    def legacy_collections(self) -> list[str]:
        """Chroma collections without the gateway's per-tenant metadata."""
        return sorted(coll.name for _, tenant, coll in self._scan() if tenant is None)

    def tenants(self, name: str) -> list[str]:
        """Tenants that have a part of collection ``name``."""
        return sorted(t for n, t, _ in self._scan() if n == name and t is not None)

    def list_sources(self, name: str, tenant: str | None = None) -> list[SourceInfo]:
        found: dict[tuple[str, str], SourceInfo] = {}
        for t in [tenant] if tenant else self.tenants(name):
            coll = self.collection(name, t)
            if coll is None:
                continue
            offset = 0
            while True:
                res = self.call(
                    name,
                    t,
                    lambda c=coll, t=t, o=offset: c.get(
                        where=with_tenant(t), include=["metadatas"], limit=PAGE_SIZE, offset=o
                    ),
                )
                metas = res.get("metadatas") or []
                for m in metas:
                    key = (str(m.get("tenant")), str(m.get("source")))
                    info = found.get(key)
                    if info is None:
                        extra = {k: v for k, v in m.items() if k not in RESERVED}
                        info = found[key] = SourceInfo(
                            source=key[1], tenant=key[0], title=str(m.get("title", "")),
                            chunks=0, mtime=float(m.get("mtime", 0.0)),
                            content_hash=str(m.get("content_hash", "")), meta=extra,
                        )  # fmt: skip
                    info.chunks += 1
                if len(metas) < PAGE_SIZE:
                    break
                offset += PAGE_SIZE
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
        coll = self.collection(name, tenant, create=True)
        assert coll is not None  # create=True returns a collection or raises
        self.call(
            name,
            tenant,
            lambda: coll.delete(where=with_tenant(tenant, {"source": {"$eq": source}})),
        )
        for start in range(0, len(ids), 1000):
            end = start + 1000
            self.call(
                name,
                tenant,
                lambda s=start, e=end: coll.add(
                    ids=ids[s:e],
                    documents=documents[s:e],
                    embeddings=embeddings[s:e],
                    metadatas=metadatas[s:e],
                ),
            )

    def delete(self, name: str, tenant: str | None = None, source: str | None = None) -> int:
        """Delete a source, a tenant's part, or (neither given) the whole collection: every
        tenant's part, and an old all-tenants collection of that name."""
        if tenant is None and source is None:
            total = 0
            for n, _, coll in self._scan():
                if n == name:
                    total += self.drop_physical(name, coll.name)
            return total
        if tenant is None:
            raise ValueError("deleting a source needs its tenant")
        coll = self.collection(name, tenant)
        if coll is None:
            return 0
        if source is None:
            return self.drop_physical(name, physical_name(name, tenant))
        where = with_tenant(tenant, {"source": {"$eq": source}})
        ids = self.call(name, tenant, lambda: coll.get(where=where, include=[]))["ids"]
        if ids:
            self.call(name, tenant, lambda: coll.delete(ids=ids))
        return len(ids)

    def drop_physical(self, name: str, physical: str) -> int:
        """Delete one Chroma collection; the chunks it held (0 if it was already gone)."""
        self._forget(physical)
        try:
            # No embedding function given: a foreign collection may have persisted another.
            count = int(self.client().get_collection(physical).count())
            self.client().delete_collection(physical)
        except Exception as e:
            if is_not_found(e):
                return 0
            raise StoreError(f"vector store error on collection {name!r}: {e}") from e
        return count

    def migrate(self, name: str) -> tuple[dict[str, int], int]:
        """Convert an old all-tenants collection (``plugins.rag.migrate``)."""
        from plugins.rag.migrate import migrate_layout

        return migrate_layout(self, name)
