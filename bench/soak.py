"""Soak: the gateway at a steady request rate for minutes, streamed and plain mixed.

    python -m bench.soak --seconds 120 --rate 50 [--stream-share 0.5] [--max-growth-mb 50]

Loopback only. Starts the fake upstream and ``gateway serve`` (bench/gateway.yaml: the demo
pipeline of auth, limit, guard rules, headers) as separate processes, then sends requests on a
fixed schedule (open loop: a slow gateway does not slow the sender) with one aiohttp client.
A tenth of the requests repeat one of a few prompts (so they exercise a cache if the config has
one). Reports req/s, p50/p99 latency, errors, and the gateway's RSS after warm-up and at the end;
exits 1 if RSS grew by more than ``--max-growth-mb`` or any request failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import time
import uuid
from pathlib import Path

import aiohttp

from bench.memory import rss_mb, wait_port
from bench.run import free_port

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-demo-LocalOnlyNeverDeployThisKey"


async def one(session: aiohttp.ClientSession, url: str, stream: bool) -> tuple[bool, float]:
    content = (
        f"soak {uuid.uuid4().hex}" if random.random() > 0.1 else f"repeat {random.randint(0, 4)}"
    )
    body = {"model": "bench", "stream": stream, "max_tokens": 50, "temperature": 0,
            "messages": [{"role": "user", "content": content}]}  # fmt: skip
    t = time.perf_counter()
    try:
        async with session.post(url, json=body) as resp:
            data = await resp.read()
            ok = resp.status == 200 and (not stream or data.rstrip().endswith(b"data: [DONE]"))
    except (TimeoutError, aiohttp.ClientError):
        ok = False
    return ok, time.perf_counter() - t


async def drive(
    url: str, seconds: float, rate: float, share: float
) -> tuple[list[bool], list[float]]:
    timeout = aiohttp.ClientTimeout(total=30)
    headers = {"authorization": f"Bearer {KEY}"}
    async with aiohttp.ClientSession(timeout=timeout, headers=headers) as session:
        tasks = []
        start = time.perf_counter()
        n = int(seconds * rate)
        for i in range(n):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(session, url, random.random() < share)))
        results = await asyncio.gather(*tasks)
    return [ok for ok, _ in results], [lat for _, lat in results]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__)
    p.add_argument("--seconds", type=float, default=120)
    p.add_argument("--rate", type=float, default=50, help="requests per second")
    p.add_argument("--stream-share", type=float, default=0.5)
    p.add_argument("--warmup", type=float, default=10, help="seconds before the first RSS sample")
    p.add_argument("--max-growth-mb", type=float, default=50)
    p.add_argument("--config", type=Path, default=ROOT / "bench" / "gateway.yaml")
    args = p.parse_args(argv)

    up_port, gw_port = free_port(), free_port()
    env = {**os.environ, "BENCH_UPSTREAM_URL": f"http://127.0.0.1:{up_port}/v1"}
    up = subprocess.Popen(
        [sys.executable, "-m", "gateway.fake_upstream", "--port", str(up_port), "--record", "0"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    gw = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "serve", "--config", str(args.config), "--port",
         str(gw_port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
    )  # fmt: skip
    try:
        wait_port(up_port)
        wait_port(gw_port)
        url = f"http://127.0.0.1:{gw_port}/v1/chat/completions"
        asyncio.run(drive(url, args.warmup, args.rate, args.stream_share))
        rss_start = rss_mb(gw.pid)
        started = time.perf_counter()
        oks, lats = asyncio.run(drive(url, args.seconds, args.rate, args.stream_share))
        elapsed = time.perf_counter() - started
        rss_end = rss_mb(gw.pid)
    finally:
        for proc in (gw, up):
            proc.terminate()
            proc.wait(20)
    lats.sort()
    result = {
        "seconds": round(elapsed, 1),
        "rate_target": args.rate,
        "requests": len(oks),
        "req_per_s": round(len(oks) / elapsed, 1),
        "errors": oks.count(False),
        "p50_ms": round(lats[len(lats) // 2] * 1000, 2),
        "p99_ms": round(lats[max(0, int(len(lats) * 0.99) - 1)] * 1000, 2),
        "rss_start_mb": round(rss_start, 1),
        "rss_end_mb": round(rss_end, 1),
        "rss_growth_mb": round(rss_end - rss_start, 1),
        "max_growth_mb": args.max_growth_mb,
    }
    print(json.dumps(result))
    return 0 if result["errors"] == 0 and result["rss_growth_mb"] <= args.max_growth_mb else 1


if __name__ == "__main__":
    raise SystemExit(main())
