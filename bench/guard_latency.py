"""Latency of the whole guard per prompt, as the plugin runs it on a request's input: rules,
secrets/PII and the semantic classifier (``Scanner.scan``), at 100 / 500 / 2,000 tokens.

    python bench/guard_latency.py                      # N=100 per size, the shipped config
    python bench/guard_latency.py --middle-windows 1   # also score one span of a long middle
    python bench/guard_latency.py -n 300 --sizes 2000

The prompts join benign dev rows (in a fixed seeded order) up to the size: what an ordinary
request sends, and the worst case, since every layer runs (a prompt the rules block skips the
classifier, as in the plugin; ``--mixed`` takes ``bench/guard_rules_bench.py``'s prompts, a
quarter of whose parts are attacks, instead). Each is scanned alone, one after the other, with
one torch thread as in the gateway; wall-clock and process CPU time per prompt are printed as
p50 / p99. The issue's target: the whole guard's p99 under 20 ms at up to 2,000 tokens on the
2-core development machine.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.guard_rules_bench import DEFAULT_DATA, build_prompts, percentile, read_rows  # noqa: E402


async def measure(sizes: list[int], n: int, middle_windows: int, data: Path, mixed: bool) -> None:
    import torch

    from plugins.guard import GuardConfig, GuardPlugin

    torch.set_num_threads(1)
    cfg = GuardConfig.model_validate(
        {"semantic": {"enabled": True, "middle_windows": middle_windows}}
    )
    plugin = GuardPlugin(cfg)
    await plugin.startup(None)  # type: ignore[arg-type]  # (loads the classifier)
    scanner = plugin.scanner
    rows = read_rows(data)
    if not mixed:  # (build_prompts draws a quarter of its parts from "attack" rows)
        benign = [r for r in rows if r["label"] == "benign"]
        rows = benign + [{**r, "label": "attack"} for r in benign]
    kind = "benign and attack rows" if mixed else "benign rows"
    print(f"\nwhole guard (rules + secrets + classifier), middle_windows={middle_windows}, "
          f"prompts of {kind}\n")  # fmt: skip
    print(
        "| prompt tokens | N | blocked (by the rules) | p50 ms | p99 ms | CPU p50 ms | CPU p99 ms |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for size in sizes:
        # Each prompt once: the scanner remembers the scores of texts it has seen.
        prompts = build_prompts(rows, size, count=n + 10)
        for t in prompts[n:]:  # warm-up
            await scanner.scan([t])
        wall, cpu, blocked, by_rules = [], [], 0, 0
        for t in prompts[:n]:
            c0, t0 = time.process_time(), time.perf_counter()
            (verdict,) = await scanner.scan([t])
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
            blocked += verdict.blocked
            by_rules += any(f.layer == "rules" for f in verdict.findings)
        p = [percentile(xs, q) * 1e3 for xs in (wall, cpu) for q in (50, 99)]
        cells = " | ".join(f"{x:.2f}" for x in p)
        print(f"| {size} | {n} | {blocked} ({by_rules}) | {cells} |", flush=True)
    await plugin.shutdown()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("-n", type=int, default=100, help="scans per prompt size")
    p.add_argument("--sizes", type=int, nargs="*", default=[100, 500, 2000])
    p.add_argument("--middle-windows", type=int, default=0)
    p.add_argument("--mixed", action="store_true", help="prompts with attack rows mixed in")
    args = p.parse_args(argv)
    asyncio.run(measure(args.sizes, args.n, args.middle_windows, args.data, args.mixed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
