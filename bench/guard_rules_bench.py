"""Latency of the guard's CPU layers per prompt: the rules layer (normalisation + decoding +
rules), and the rules layer plus the secrets/PII detector.

    python bench/guard_rules_bench.py                  # 100 / 500 / 2,000 tokens, N=300 each
    python bench/guard_rules_bench.py -n 50 --quality  # quick run, plus detection / FP rates

Prompts are built by concatenating benign and attack rows of the guard dev set (in a fixed,
seeded order) until they reach the target size in tokens (``gateway.tokens.count_text``). Each
prompt is scanned one at a time with ``Scanner.scan_sync([text], secrets=...)`` (no semantic
layer), the guard plugin's default configuration. ``--quality`` also reports the rules-only
detection rate on attack rows and the false-positive rate on benign rows of the whole set, and
the hard negatives in tests/data/.

``--root DIR`` imports ``plugins.guard`` from another checkout (a before/after comparison).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = Path("/work/shared/guard-data/dev.jsonl")
SIZES = (100, 500, 2000)


def read_rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def build_prompts(rows: list[dict[str, Any]], tokens: int, count: int, seed: int = 7) -> list[str]:
    """``count`` prompts of about ``tokens`` tokens, mostly benign with an attack row mixed in
    (a realistic mix: long prompts are documents with, sometimes, something injected)."""
    from gateway.tokens import count_text

    rng = random.Random(seed + tokens)
    benign = [r["text"] for r in rows if r["label"] == "benign"]
    attack = [r["text"] for r in rows if r["label"] == "attack"]
    out = []
    for _ in range(count):
        parts: list[str] = []
        n = 0
        while n < tokens:
            pool = attack if rng.random() < 0.25 else benign
            t = rng.choice(pool)
            parts.append(t)
            n += count_text(t)
        text = "\n\n".join(parts)
        # Trim back to the target size (to a word boundary): token counts are what matter.
        while count_text(text) > tokens and " " in text:
            text = text[: int(len(text) * 0.97)].rsplit(" ", 1)[0]
        out.append(text)
    return out


def make_scanner() -> Any:
    from plugins.guard import GuardConfig, GuardPlugin

    # The plugin's default scanner, rules only (the semantic model loads in startup()).
    return GuardPlugin(GuardConfig()).scanner


def percentile(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


def latency(
    scanner: Any, prompts: list[str], n: int, secrets: bool
) -> tuple[float, float, float, float]:
    """p50 / p99 of wall-clock and of CPU time (ms). CPU time leaves out the time this process
    waited for a core, which dominates wall-clock p99 on a shared machine."""
    for t in prompts[:20]:  # warm-up
        scanner.scan_sync([t], secrets)
    wall, cpu = [], []
    for i in range(n):
        t = prompts[i % len(prompts)]
        c0, t0 = time.process_time(), time.perf_counter()
        scanner.scan_sync([t], secrets)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return tuple(percentile(xs, q) * 1e3 for xs in (wall, cpu) for q in (50, 99))  # type: ignore[return-value]


def quality(scanner: Any, rows: list[dict[str, Any]]) -> dict[str, Any]:
    def flagged(text: str) -> bool:
        return bool(scanner.rule_findings(text))

    att = [r for r in rows if r["label"] == "attack"]
    ben = [r for r in rows if r["label"] != "attack"]
    hits = sum(flagged(r["text"]) for r in att)
    fps = sum(flagged(r["text"]) for r in ben)
    hard: dict[str, str] = {}
    for f in sorted((ROOT / "tests" / "data").glob("guard_hard_negatives*.jsonl")):
        hn = read_rows(f)
        hard[f.name] = f"{sum(flagged(r['text']) for r in hn)} of {len(hn)}"
    return {
        "detection": f"{hits / len(att):.2%} ({hits} of {len(att)})",
        "benign_blocked": f"{fps / len(ben):.2%} ({fps} of {len(ben)})",
        "hard_negatives": hard,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("-n", type=int, default=300, help="scans per prompt size")
    p.add_argument("--sizes", type=int, nargs="*", default=list(SIZES))
    p.add_argument("--quality", action="store_true", help="also detection / FP on all rows")
    p.add_argument("--root", type=Path, default=ROOT, help="checkout to import plugins from")
    args = p.parse_args(argv)

    sys.path.insert(0, str(ROOT))  # gateway.*
    if args.root != ROOT:
        sys.path.insert(0, str(args.root.resolve()))
    rows = read_rows(args.data)
    scanner = make_scanner()
    import plugins.guard

    print(f"plugins.guard from {Path(plugins.guard.__file__).parent}")
    print("\n| layers | prompt tokens | N | p50 ms | p99 ms | CPU p50 ms | CPU p99 ms |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for size in args.sizes:
        prompts = build_prompts(rows, size, count=50)
        for label, secrets in (("rules", False), ("rules + secrets", True)):
            p50, p99, c50, c99 = latency(scanner, prompts, args.n, secrets)
            print(
                f"| {label} | {size} | {args.n} | {p50:.2f} | {p99:.2f} | {c50:.2f} | {c99:.2f} |",
                flush=True,
            )
    if args.quality:
        q = quality(scanner, rows)
        print(
            f"\nrules only, all {len(rows)} rows: attacks caught {q['detection']}, "
            f"benign blocked {q['benign_blocked']}"
        )
        for name, v in q["hard_negatives"].items():
            print(f"hard negatives {name}: {v} blocked")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
