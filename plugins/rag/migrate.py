"""Converting the old layout (one Chroma collection holding every tenant's chunks) into one
collection per tenant: ``gateway rag migrate --collection NAME``."""

from __future__ import annotations

import logging

from plugins.rag.chroma import is_not_found
from plugins.rag.store import META_COLLECTION, PAGE_SIZE, StoreError, VectorStore

log = logging.getLogger("gateway.rag")


def migrate_layout(store: VectorStore, name: str) -> tuple[dict[str, int], int]:
    """Split an old all-tenants collection ``name`` into per-tenant collections, copying
    the stored vectors (nothing is re-embedded), then drop it. Returns the chunks moved per
    tenant and the chunks without a tenant; with any of those the old collection is kept.
    Safe to re-run after an interruption (chunks are upserted under their own ids)."""
    try:
        old = store.client().get_collection(name)
    except Exception as e:
        if is_not_found(e):
            return {}, 0
        raise StoreError(f"vector store error on collection {name!r}: {e}") from e
    if META_COLLECTION in (old.metadata or {}):
        return {}, 0  # a per-tenant collection: nothing to migrate
    moved: dict[str, int] = {}
    orphans = offset = 0
    while True:
        try:
            res = old.get(
                include=["documents", "metadatas", "embeddings"], limit=PAGE_SIZE, offset=offset
            )
        except Exception as e:
            raise StoreError(f"vector store error on collection {name!r}: {e}") from e
        groups: dict[str, list[int]] = {}
        for i, m in enumerate(res["metadatas"] or []):
            t = (m or {}).get("tenant")
            if isinstance(t, str) and t:
                groups.setdefault(t, []).append(i)
            else:
                orphans += 1
        for t, idx in groups.items():
            coll = store.collection(name, t, create=True)
            assert coll is not None
            batch = {
                "ids": [res["ids"][i] for i in idx],
                "documents": [res["documents"][i] for i in idx],
                "embeddings": [res["embeddings"][i] for i in idx],
                "metadatas": [res["metadatas"][i] for i in idx],
            }
            store.call(name, t, lambda c=coll, b=batch: c.upsert(**b))
            moved[t] = moved.get(t, 0) + len(idx)
        if len(res["ids"]) < PAGE_SIZE:
            break
        offset += PAGE_SIZE
    if not orphans:
        store.drop_physical(name, name)
    log.info("rag_migrated", extra={"collection": name, "tenants": moved, "orphans": orphans})
    return moved, orphans
