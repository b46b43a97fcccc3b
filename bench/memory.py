"""Resident memory of the gateway holding many slow streams open at once.

    python -m bench.memory --streams 1000 [--config bench/gateway.yaml]

Starts the fake upstream (slow streams: ``--chunks`` chunks ``--delay-ms`` apart) and the gateway
as separate processes, opens N concurrent streamed requests with one aiohttp client, and samples
the gateway's RSS (``/proc/PID/status``) before, at the peak, and after the streams end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

from bench.run import free_port

ROOT = Path(__file__).resolve().parent.parent


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def gateway_pids(parent: int) -> list[int]:
    """The serving process: uvicorn runs in the same process for one worker."""
    return [parent]


async def hold_streams(url: str, n: int, headers: dict[str, str], body: bytes) -> tuple[int, int]:
    ok = errors = 0
    conn = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as session:

        async def one() -> None:
            nonlocal ok, errors
            try:
                async with session.post(url, data=body, headers=headers) as resp:
                    data = await resp.read()
                    if resp.status == 200 and data.endswith(b"data: [DONE]\n\n"):
                        ok += 1
                    else:
                        errors += 1
            except aiohttp.ClientError:
                errors += 1

        await asyncio.gather(*(one() for _ in range(n)))
    return ok, errors


def wait_port(port: int, timeout: float = 60) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"port {port} did not open")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__)
    p.add_argument("--streams", type=int, default=1000)
    p.add_argument("--chunks", type=int, default=20)
    p.add_argument("--delay-ms", type=int, default=500)
    p.add_argument("--config", type=Path, default=ROOT / "bench" / "gateway.yaml")
    p.add_argument(
        "--header",
        action="append",
        metavar="NAME:VALUE",
        default=["Authorization: Bearer sk-demo-LocalOnlyNeverDeployThisKey"],
    )
    args = p.parse_args(argv)

    up_port, gw_port = free_port(), free_port()
    env = {**os.environ, "BENCH_UPSTREAM_URL": f"http://127.0.0.1:{up_port}/v1"}
    up = subprocess.Popen(
        [sys.executable, "-m", "gateway.fake_upstream", "--port", str(up_port), "--record", "0",
         "--chunks", str(args.chunks), "--delay-ms", str(args.delay_ms)],
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
        time.sleep(1)
        headers = {"content-type": "application/json"}
        for h in args.header:
            name, _, value = h.partition(":")
            headers[name.strip()] = value.strip()
        body = json.dumps(
            {
                "model": "bench",
                "stream": True,
                "messages": [{"role": "user", "content": "hello " * 20}],
            }
        ).encode()
        before = rss_mb(gw.pid)
        peak = before
        stream_s = args.chunks * args.delay_ms / 1000

        async def run() -> tuple[int, int]:
            task = asyncio.create_task(
                hold_streams(
                    f"http://127.0.0.1:{gw_port}/v1/chat/completions", args.streams, headers, body
                )
            )
            nonlocal peak
            while not task.done():
                peak = max(peak, rss_mb(gw.pid))
                await asyncio.sleep(0.2)
            return await task

        t0 = time.monotonic()
        ok, errors = asyncio.run(run())
        elapsed = time.monotonic() - t0
        time.sleep(1)
        after = rss_mb(gw.pid)
        print(
            "| streams | stream length | ok | errors | wall s | RSS before MB | RSS peak MB |"
            " RSS after MB |"
        )
        print("|--:|--:|--:|--:|--:|--:|--:|--:|")
        print(f"| {args.streams} | {stream_s:.1f} s | {ok} | {errors} | {elapsed:.1f} | "
              f"{before:.0f} | {peak:.0f} | {after:.0f} |")  # fmt: skip
    finally:
        gw.terminate()
        up.terminate()
        gw.wait(10)
        up.wait(10)


if __name__ == "__main__":
    main()
