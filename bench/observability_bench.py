"""Micro-benchmark of accounting: ``gateway.accounting.account`` per request (the core metrics, the
request log line, the cost/usage metrics and the ledger's append), for N synthetic requests.

    python bench/observability_bench.py --n 20000
    python bench/observability_bench.py --n 20000 --no-ledger --log none

Budget: logging + metrics under 0.2 ms p50 per request. The ledger's database writes happen in
its background thread and are not on this path (only the append is); the request log is written
to a temporary file (serialisation and buffering included, as in production).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.accounting import account
from gateway.config import parse_settings
from gateway.context import Identity, RequestContext, Usage
from gateway.state import Gateway


def make_settings(tmp: Path, log: str, ledger: bool, tracing: bool) -> Any:
    dep = {"model": "demo-upstream", "base_url": "http://127.0.0.1:9",
           "price": {"input_per_mtok": 0.15, "output_per_mtok": 0.6}}  # fmt: skip
    return parse_settings({
        "models": [{"name": "demo", "deployments": [dep]}],
        "logging": {"request_log": str(tmp / "requests.jsonl") if log == "file" else log},
        "ledger": {"url": f"sqlite:///{tmp}/usage.db" if ledger else "none"},
        "tracing": {"enabled": tracing, "exporter": "memory"},
        "metrics": {"tenants": ["acme"]},
    })  # fmt: skip


def make_ctx(gw: Gateway, i: int) -> RequestContext:
    entry = gw.catalogue.get("demo")
    assert entry is not None
    now = time.perf_counter()
    ctx = RequestContext(
        request_id=f"req-{i}", endpoint="chat", path="/v1/chat/completions", method="POST",
        headers={}, raw_headers=[], body={"model": "demo"}, started=now - 0.05,
        stream=i % 2 == 0, model="demo", model_entry=entry, deployment=entry.deployments[0],
        identity=Identity(user=f"user{i % 50}", tenant="acme" if i % 3 else "globex",
                          credential_id=f"key{i % 50}"),
        usage=Usage(120, 40), status=200, attempts=1, upstream_started=now - 0.049,
        upstream_first_byte=now - 0.04, finished=now,
    )  # fmt: skip
    ctx.attempt_log.append({"deployment": "demo/0", "provider": "openai", "status": 200,
                            "error": None, "ms": 9.0})  # fmt: skip
    ctx.log["limit"] = "admitted"
    ctx.log["guard"] = {"mode": "enforce", "input": {"action": "allow", "categories": []}}
    return ctx


async def run(n: int, log: str, ledger: bool, tracing: bool) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        gw = Gateway(make_settings(Path(tmp), log, ledger, tracing))
        await gw.startup()
        try:
            ctxs = [make_ctx(gw, i) for i in range(n)]
            tracer = gw.tracer
            for ctx in ctxs[: min(500, n)]:  # warm up (label children, caches)
                account(gw, ctx)
            times = []
            for ctx in ctxs:
                t0 = time.perf_counter_ns()
                if tracer is not None:  # the span's start is part of the cost too
                    tracer.start(ctx)
                account(gw, ctx)
                times.append((time.perf_counter_ns() - t0) / 1e6)
                if len(times) % 1000 == 0:
                    await asyncio.sleep(0)  # let the flusher run, as the server would
        finally:
            await gw.shutdown()
    times.sort()
    return {
        "n": n,
        "p50_ms": round(statistics.median(times), 4),
        "p90_ms": round(times[int(0.9 * len(times))], 4),
        "p99_ms": round(times[int(0.99 * len(times))], 4),
        "mean_ms": round(statistics.fmean(times), 4),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--log", default="file", choices=["file", "none"])
    ap.add_argument("--no-ledger", action="store_true")
    ap.add_argument("--tracing", action="store_true", help="also record spans (memory exporter)")
    args = ap.parse_args()
    result = asyncio.run(run(args.n, args.log, not args.no_ledger, args.tracing))
    label = f"account(): log={args.log} ledger={not args.no_ledger} tracing={args.tracing}"
    print(label, result)
    budget = 0.2
    verdict = "OK" if result["p50_ms"] < budget else "OVER BUDGET"
    print(f"p50 {result['p50_ms']} ms per request (budget {budget} ms): {verdict}")


if __name__ == "__main__":
    main()
