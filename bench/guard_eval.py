"""Evaluate the prompt-injection guard alone over the labelled guard data.

    python bench/guard_eval.py --split validation            # all layers, whole split
    python bench/guard_eval.py --limit 300 --json out.json   # a quick sample

For (a) the semantic layer alone, (b) the rules layer alone and (c) the whole guard (rules or
semantic blocks; as in the plugin, the classifier only scores what the rules did not block),
prints per family the detection rate (attacks) or false-positive rate (benign) with counts, the
overall rates, and p50/p99 latency per prompt (one prompt at a time, one torch thread, as the
gateway scores). The first table leaves out the rows training may not use
(``wildguard_judgecomp``: research-only licence, and labels that rate a model's answer rather
than the prompt); those rows get their own table, then come the totals over every row of the
split, which are what the targets are read against.
Hard-negative files under tests/data/ are reported separately.
Rows are assigned to splits by ``plugins.guard.semantic.split_of`` (hash of the normalised
text), the rule the training script used; validation numbers are in-distribution (the data has
near-duplicate templates on both sides of any split).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from plugins.guard.semantic import SemanticDetector, split_of  # noqa: E402

DEFAULT_DATA = Path("/work/shared/guard-data/dev.jsonl")
HARD_NEGATIVE_GLOB = "guard_hard_negatives*.jsonl"
#: Short everyday prompts ("Hiya", "Carry on") never used in training: the dev data has almost
#: no short benign prompts, and a classifier trained on it learnt "short means attack".
#: Everyday task prompts with words the attack data is full of ("reveal", "print", "from now on",
#: "rules"), written apart from the hard negatives and never used in training either.
#: Benign requests framed in attack words (a story about "BYPASS", "keep the salary figures out",
#: security education, product copy), written 26 Nov; training on them did not pay (see
#: docs/guard_eval.md), so they measure the shipped model instead.
#: Long documents (1,200-1,700 characters) with a sentence put in their middle, past the
#: classifier's head-and-tail window: 20 benign ones that say "ignore", "instructions" or
#: "system", and 20 paraphrased injections (written 27 Nov for Scanner.middle_spans).
HELD_OUT = (
    "guard_short_benign_holdout.jsonl",
    "guard_everyday_benign_holdout.jsonl",
    "guard_framing_benign_holdout.jsonl",
    "guard_middle_holdout.jsonl",
)
#: Left out of training by scripts/train_guard.py (research-only licence).
EXCLUDED_ORIGINS = {"wildguard_judgecomp"}


def read_jsonl(path: Path, default_family: str) -> list[dict[str, Any]]:
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            r = json.loads(line)
            r.setdefault("label", "benign")
            r.setdefault("family", default_family)
            rows.append(r)
    return rows


def rules_checker() -> Callable[[str], bool] | None:
    """The rules layer as the plugin builds it by default, or None when it is not importable."""
    try:
        from plugins.guard.decode import DECODERS
        from plugins.guard.rules import RulesConfig, RuleSet
        from plugins.guard.scanner import Scanner
    except ImportError as exc:
        print(f"rules layer not available ({exc})")
        return None
    scanner = Scanner(RuleSet(RulesConfig().effective()), decoders=tuple(DECODERS))
    return lambda text: bool(scanner.rule_findings(text))


def evaluate(rows: list[dict[str, Any]], flag: Callable[[str], bool]) -> dict[str, Any]:
    """Flag every row one at a time; rates per (label, family), overall, latency."""
    fam: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    times = np.zeros(len(rows))
    flagged = np.zeros(len(rows), dtype=bool)
    for i, r in enumerate(rows):
        t = time.perf_counter()
        flagged[i] = flag(r["text"])
        times[i] = time.perf_counter() - t
        fam[(r["label"], r["family"])][0] += int(flagged[i])
        fam[(r["label"], r["family"])][1] += 1
    is_attack = np.array([r["label"] == "attack" for r in rows], dtype=bool)

    def rate(mask: np.ndarray) -> dict[str, Any]:
        n = int(mask.sum())
        hit = int(flagged[mask].sum())
        return {"flagged": hit, "n": n, "rate": hit / n if n else None}

    return {
        "flagged": [bool(f) for f in flagged],
        "families": [
            {"label": lab, "family": f, "flagged": h, "n": n, "rate": h / n}
            for (lab, f), (h, n) in sorted(fam.items(), key=lambda kv: (kv[0][0], -kv[1][1]))
        ],
        "detection": rate(is_attack),
        "fpr": rate(~is_attack),
        "latency_ms": {
            "p50": round(float(np.percentile(times, 50)) * 1e3, 2),
            "p99": round(float(np.percentile(times, 99)) * 1e3, 2),
        }
        if len(rows)
        else None,
    }


def _total(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Two ``{"flagged", "n", "rate"}`` counts added up."""
    hit, n = a["flagged"] + b["flagged"], a["n"] + b["n"]
    return {"flagged": hit, "n": n, "rate": hit / n if n else None}


def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def print_table(title: str, layers: dict[str, dict[str, Any]]) -> None:
    names = list(layers)
    print(f"\n### {title}\n")
    print("| label | family | n | " + " | ".join(names) + " |")
    print("| --- | --- | ---: | " + " | ".join("---:" for _ in names) + " |")
    first = layers[names[0]]
    for i, row in enumerate(first["families"]):
        cells = [
            f"{pct(layers[n]['families'][i]['rate'])} ({layers[n]['families'][i]['flagged']})"
            for n in names
        ]
        print(f"| {row['label']} | {row['family']} | {row['n']} | " + " | ".join(cells) + " |")
    for key, label in (("detection", "**attacks detected**"), ("fpr", "**benign blocked**")):
        n = first[key]["n"]
        if n:
            cells = [
                f"**{pct(layers[x][key]['rate'])}** ({layers[x][key]['flagged']})" for x in names
            ]
            print(f"| {label} | all | {n} | " + " | ".join(cells) + " |")
    lat = [layers[x]["latency_ms"] for x in names]
    print(
        "| latency p50 / p99 ms | | | " + " | ".join(f"{v['p50']} / {v['p99']}" for v in lat) + " |"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--split", choices=("validation", "train"), default="validation")
    p.add_argument("--limit", type=int, default=0, help="evaluate the first N rows of the split")
    p.add_argument("--hard-negatives-dir", type=Path, default=ROOT / "tests" / "data")
    p.add_argument("--model-path", default=None, help="default: the shipped plugins/guard/model")
    p.add_argument("--threshold", type=float, default=0.5)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)

    rows = [r for r in read_jsonl(args.data, "unknown") if split_of(r["text"]) == args.split]
    if args.limit:
        rows = rows[: args.limit]
    hard = {
        f.name: read_jsonl(f, "hard_negative")
        for f in sorted(args.hard_negatives_dir.glob(HARD_NEGATIVE_GLOB))
    }
    held_out = {
        name: read_jsonl(args.hard_negatives_dir / name, "held_out")
        for name in HELD_OUT
        if (args.hard_negatives_dir / name).exists()
    }

    import torch

    torch.set_num_threads(1)  # as in the gateway: one dedicated scoring thread
    detector = SemanticDetector(args.model_path, args.threshold)
    detector.load()
    rules = rules_checker()

    from plugins.guard.config import SemanticConfig
    from plugins.guard.decode import DECODERS
    from plugins.guard.scanner import DECODED_THRESHOLD, MIDDLE_THRESHOLD, Scanner

    # The plugin also scores the prompt with its markup and escapes decoded, the payloads it
    # hides in base64, hex or %-escapes that read as prose (Scanner._decoded_prose), and the
    # spans of a long prompt's middle that its one window leaves out and that hold injection
    # words (Scanner.middle_spans), each counted from its own floor: the highest score counts.
    extra = Scanner(
        None,
        decoders=tuple(DECODERS),
        semantic=detector,
        middle_windows=SemanticConfig().middle_windows,
    )

    def semantic(text: str) -> bool:
        if detector.is_attack(detector.score([text])[0]):
            return True
        floor = max(detector.threshold, DECODED_THRESHOLD)
        if any(detector.score([d])[0] >= floor for d in extra._decoded_prose(text)):
            return True
        floor = max(detector.threshold, MIDDLE_THRESHOLD)
        return any(detector.score([m])[0] >= floor for m in extra.middle_spans(text))

    layers: dict[str, Callable[[str], bool]] = {"semantic": semantic}
    if rules is not None:
        layers["rules"] = rules
        # Whole guard, as the plugin runs it in enforce mode: the rules (cheap) first, and the
        # classifier only for prompts they did not block.
        layers["guard"] = lambda t: rules(t) or semantic(t)

    # ``wildguard_judgecomp`` rows apart, as training leaves them out: their licence is
    # research-only, and their labels judge the harm of a model's answer, not whether the prompt
    # attacks the model (the same "very direct assistant" jailbreak template is labelled attack
    # 28 times and benign 16 times). The totals over every row still count them.
    used = [r for r in rows if r.get("origin") not in EXCLUDED_ORIGINS]
    excluded = [r for r in rows if r.get("origin") in EXCLUDED_ORIGINS]
    results: dict[str, Any] = {"split": args.split, "rows": len(used), "threshold": args.threshold}
    results["layers"] = {name: evaluate(used, fn) for name, fn in layers.items()}
    print_table(
        f"{args.split} split, {len(used)} rows (in-distribution; without "
        f"{', '.join(sorted(EXCLUDED_ORIGINS))})",
        results["layers"],
    )
    if excluded:
        results["excluded_origins"] = {name: evaluate(excluded, fn) for name, fn in layers.items()}
        print_table(
            f"{args.split} split, the {len(excluded)} {', '.join(sorted(EXCLUDED_ORIGINS))} rows",
            results["excluded_origins"],
        )
        results["all_rows"] = {
            name: {
                key: _total(results["layers"][name][key], results["excluded_origins"][name][key])
                for key in ("detection", "fpr")
            }
            for name in layers
        }
        print(f"\nEvery row of the {args.split} split ({len(rows)} rows):\n")
        for name, res in results["all_rows"].items():
            d, f = res["detection"], res["fpr"]
            print(
                f"- {name}: {pct(d['rate'])} of attacks detected ({d['flagged']}/{d['n']}), "
                f"{pct(f['rate'])} of benign blocked ({f['flagged']}/{f['n']})"
            )
    results["hard_negatives"] = {}
    for name, hrows in hard.items():
        res = {layer: evaluate(hrows, fn) for layer, fn in layers.items()}
        results["hard_negatives"][name] = res
        print_table(f"hard negatives: tests/data/{name}, {len(hrows)} rows (all splits)", res)
    for name, hrows in held_out.items():
        res = {layer: evaluate(hrows, fn) for layer, fn in layers.items()}
        results["hard_negatives"][name] = res
        print_table(f"held out (never trained on): tests/data/{name}, {len(hrows)} rows", res)
    if args.json:
        for res in [
            *results["layers"].values(),
            *results.get("excluded_origins", {}).values(),
            *(r for h in results["hard_negatives"].values() for r in h.values()),
        ]:
            res.pop("flagged", None)  # per-row verdicts: only used above
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
