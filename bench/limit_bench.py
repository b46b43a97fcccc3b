"""Micro-benchmark of the limit plugin: on_request + on_response per request, memory and Redis.

    python bench/limit_bench.py --n 2000                      # memory and redis://127.0.0.1:6379/14
    python bench/limit_bench.py --n 2000 --redis ""           # memory only

Measures the plugin's own cost (prompt token counting included, as the plugin triggers it) with
four rules on each request: user rpm + tpm + max_parallel, tenant daily/monthly budget.
Budgets: p50 under 0.3 ms in memory, under 1 ms with Redis on loopback.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.catalogue import Deployment, ModelEntry, Price
from gateway.context import Identity, RequestContext, Usage
from plugins.limit import LimitConfig, LimitPlugin

ENTRY = ModelEntry(
    name="demo",
    deployments=(
        Deployment(model="m", base_url="http://127.0.0.1:9", price=Price(input_per_mtok=1.0)),
    ),
)
RULES = [
    {"scope": "user", "rpm": 10_000_000, "tpm": 10**12, "max_parallel": 1000},
    {"scope": "tenant", "budget_usd": {"day": 1e9, "month": 1e10}},
]


def make_ctx(i: int) -> RequestContext:
    return RequestContext(
        request_id=f"r{i}", endpoint="chat", path="/v1/chat/completions", method="POST",
        headers={}, raw_headers=[], client="127.0.0.1", model="demo", model_entry=ENTRY,
        body={"model": "demo", "max_tokens": 256,
              "messages": [{"role": "user", "content": "Summarise our Q3 sales in two lines."}]},
        identity=Identity(f"user-{i % 50}", "acme", (), "free", f"key-{i % 50}"),
    )  # fmt: skip


async def run(store: str, n: int) -> list[float]:
    prefix = f"gwlimit-bench-{uuid.uuid4().hex[:8]}"
    plugin = LimitPlugin(LimitConfig.model_validate({"store": store, "key_prefix": prefix,
                                                     "rules": RULES}))  # fmt: skip
    await plugin.startup(None)
    times: list[float] = []
    try:
        for i in range(n + n // 10):  # first 10% warm up
            ctx = make_ctx(i)
            t0 = time.perf_counter()
            await plugin.on_request(ctx)
            ctx.usage, ctx.status = Usage(20, 30), 200
            await plugin.on_response(ctx)
            if i >= n // 10:
                times.append(time.perf_counter() - t0)
        if store != "memory":
            client = plugin.store.client  # type: ignore[attr-defined]
            keys = [k async for k in client.scan_iter(match=f"{prefix}:*")]
            if keys:
                await client.delete(*keys)
    finally:
        await plugin.shutdown()
    return times


def report(name: str, times: list[float]) -> None:
    ms = sorted(t * 1000 for t in times)
    p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
    print(f"{name:8s} n={len(ms):6d}  p50={statistics.median(ms):.3f} ms  p99={p99:.3f} ms  "
          f"mean={statistics.fmean(ms):.3f} ms")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--redis", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/14"))
    args = ap.parse_args()
    report("memory", asyncio.run(run("memory", args.n)))
    if args.redis:
        report("redis", asyncio.run(run(args.redis, args.n)))


if __name__ == "__main__":
    main()
