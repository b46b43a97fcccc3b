"""Chroma, as the vector store uses it: the client for an embedded directory or a server, its
shutdown, and our embedder in the shape Chroma keeps on a collection (so it never builds its
default one, which downloads a model). Telemetry is always off.
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import urlsplit

from chromadb.api.types import Documents, EmbeddingFunction, Embeddings
from chromadb.utils.embedding_functions import register_embedding_function

from plugins.rag.config import StoreConfig
from plugins.rag.embed import Embedder

log = logging.getLogger("gateway.rag")


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


def connect(config: StoreConfig, timeout_s: float) -> Any:
    """A Chroma client: HTTP when ``config.url`` is set (its calls bounded by ``timeout_s``),
    else embedded in ``config.path``."""
    import chromadb
    from chromadb.config import Settings

    settings = Settings(anonymized_telemetry=False)
    if not config.url:
        return chromadb.PersistentClient(path=config.path, settings=settings)
    parts = urlsplit(config.url)
    client = chromadb.HttpClient(
        host=parts.hostname or "127.0.0.1",
        port=parts.port or (443 if parts.scheme == "https" else 8000),
        ssl=parts.scheme == "https",
        settings=settings,
    )
    _bound_http_timeout(client, timeout_s)
    return client


def close_client(client: Any) -> None:
    """Close a client from :func:`connect`; never raises (it runs at shutdown)."""
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


def is_not_found(e: Exception) -> bool:
    text = f"{type(e).__name__} {e}".lower()
    return "notfound" in text or "does not exist" in text or "not found" in text


def _bound_http_timeout(client: Any, timeout_s: float) -> None:
    """Chroma's HTTP client waits forever by default; bound it (best effort, private field)."""
    import httpx

    session = getattr(getattr(client, "_server", None), "_session", None)
    if isinstance(session, httpx.Client):
        session.timeout = httpx.Timeout(timeout_s)
