"""CPU per request on the gateway's hot path, measured in process.

No load generator and no network stack on the gateway's side, so no noise from wrk sharing
the cores. Calls the ASGI app directly, as uvicorn would (scope, ``receive``, ``send``), ``--n``
times with ``--conc`` requests in flight, against the fake upstream in a separate process over
a real loopback socket, so the upstream client's cost is included and the fake's is not.
Prints the process CPU time per request.

    python -m bench.hotpath --config bench/gateway-core.yaml --scenario chat
    python -m bench.hotpath --target null --scenario stream          # the null proxy, same way
    python -m bench.hotpath --scenario paced --conc 4                # one event per read
    python -m bench.hotpath --scenario paced --pace-ms 40 --conc 4 --n 40 --callgrind
    python -m bench.hotpath --profile /tmp/gw.prof                   # cProfile, top functions
    python -m bench.hotpath --callgrind                              # instructions per request

``--callgrind`` runs the driver under ``valgrind --tool=callgrind`` with instrumentation off
until the warm-up is done, then counts the instructions of the ``--n`` measured requests only
(a tiny C helper, compiled with gcc, issues callgrind's client requests). Instruction counts
repeat to within ~1% whatever else the machine is doing, unlike timings on a shared 2-core VM.
``paced`` has the fake pause 1 ms before each chunk, as bench.run's scenario, so that most reads
hold one event. Under callgrind the driver runs ~50x slower and the events would pile up: count
it with ``--pace-ms 40 --conc 4`` (one event per read, and the same counts run after run).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.load import counter_start, numbered
from bench.run import DEMO_KEY, ROOT, free_port, request_body, scenario_headers


def _scope(
    path: str, body: bytes, auth: bool, scenario: str = "chat", pace_ms: float | None = None
) -> dict[str, Any]:
    # What uvicorn (httptools) hands over for wrk's request.
    headers = [
        (b"host", b"127.0.0.1:8090"),
        (b"content-length", str(len(body)).encode()),
        (b"content-type", b"application/json"),
    ]
    extra = scenario_headers(scenario)
    if pace_ms is not None and extra:
        extra["x-fake-delay-ms"] = str(pace_ms)
    headers += [(k.encode(), v.encode()) for k, v in extra.items()]
    if auth:
        headers.append((b"authorization", f"Bearer {DEMO_KEY}".encode()))
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "server": ("127.0.0.1", 8090),
        "client": ("127.0.0.1", 50000),
        "scheme": "http",
        "method": "POST",
        "root_path": "",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": headers,
        "state": {},
    }


async def _one(app: Any, scope: dict[str, Any], body: bytes) -> int:
    """One request; returns the status. ``receive`` behaves as uvicorn's: the body, then
    (once the response is complete) ``http.disconnect``."""
    done = asyncio.Event()
    sent_body = False
    status = 0

    async def receive() -> dict[str, Any]:
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": body, "more_body": False}
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif not message.get("more_body", False):
            done.set()

    await app(dict(scope), receive, send)
    return status


async def _drive(app: Any, scope: dict[str, Any], body: bytes, n: int, conc: int) -> None:
    remaining = n
    # A different prompt in each request (as bench.load sends): nothing cached can help.
    start = counter_start()
    bodies = [numbered(body, start + i) for i in range(n)]

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            status = await _one(app, scope, bodies[remaining])
            if status != 200:
                raise SystemExit(f"status {status}")

    await asyncio.gather(*(worker() for _ in range(conc)))


async def _main(args: argparse.Namespace, upstream: str) -> None:
    body = request_body(args.scenario)
    if args.target == "null":
        from bench.null_proxy import NullProxy

        null = NullProxy(upstream)
        app: Any = null
        # The session NullProxy's lifespan would open.
        import aiohttp

        null.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=1000),
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
        )
        scope = _scope("/v1/chat/completions", body, False, args.scenario, args.pace_ms)
        close: Any = null.session.close
    else:
        from gateway.app import create_app
        from gateway.config import load_settings

        settings = load_settings(args.config)
        app = create_app(settings)
        await app.gateway.startup()
        scope = _scope("/v1/chat/completions", body, True, args.scenario, args.pace_ms)
        close = app.gateway.shutdown
    try:
        await _drive(app, scope, body, args.warmup, args.conc)
        cg = _callgrind_hooks()
        if cg is not None:
            cg.cg_start()
            cg.cg_zero()
        profiler = None
        if args.profile:
            import cProfile

            profiler = cProfile.Profile(time.process_time)
            profiler.enable()
        cpu, wall = time.process_time(), time.perf_counter()
        await _drive(app, scope, body, args.n, args.conc)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        if cg is not None:
            cg.cg_stop()
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(args.profile)
            import pstats

            pstats.Stats(args.profile).sort_stats("tottime").print_stats(args.top)
        print(
            f"{args.target} {Path(args.config).name if args.target == 'gateway' else ''} "
            f"{args.scenario} conc={args.conc} n={args.n}: "
            f"{cpu / args.n * 1e6:.1f} us CPU/request, {wall / args.n * 1e6:.1f} us wall/request"
        )
    finally:
        await close()


_HELPER = """
#include <valgrind/callgrind.h>
void cg_start(void) { CALLGRIND_START_INSTRUMENTATION; }
void cg_zero(void) { CALLGRIND_ZERO_STATS; }
void cg_stop(void) { CALLGRIND_STOP_INSTRUMENTATION; }
"""


def _callgrind_hooks() -> Any:
    lib = os.environ.get("HOTPATH_CALLGRIND_LIB")
    if not lib:
        return None
    import ctypes

    return ctypes.CDLL(lib)


def _instructions(out_file: Path) -> int:
    # "totals:" (what was counted); "summary:" is off after CALLGRIND_ZERO_STATS.
    for line in out_file.read_text().splitlines():
        if line.startswith("totals:"):
            return int(line.split()[1])
    raise RuntimeError(f"no instruction total in {out_file}")


def _callgrind(args: argparse.Namespace, argv: list[str]) -> None:
    if shutil.which("valgrind") is None or shutil.which("gcc") is None:
        raise SystemExit("--callgrind needs valgrind (with its headers) and gcc")
    with tempfile.TemporaryDirectory(prefix="hotpath-cg-") as tmp:
        src, lib, out = Path(tmp) / "cg.c", Path(tmp) / "cg.so", Path(tmp) / "callgrind.out"
        src.write_text(_HELPER)
        subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(lib), str(src)], check=True)
        cmd = ["valgrind", "--tool=callgrind", "--instr-atstart=no",
               f"--callgrind-out-file={out}", sys.executable, "-m", "bench.hotpath",
               *[a for a in argv if a != "--callgrind"]]  # fmt: skip
        env = dict(os.environ, HOTPATH_CALLGRIND_LIB=str(lib))
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise SystemExit(f"callgrind run failed:\n{proc.stderr[-3000:]}")
        total = _instructions(out)
        if args.keep_callgrind:
            shutil.copy(out, args.keep_callgrind)
    name = Path(args.config).name if args.target == "gateway" else ""
    print(f"{args.target} {name} {args.scenario} conc={args.conc} n={args.n}: "
          f"{total / args.n / 1e3:.0f} k instructions/request (callgrind)")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m bench.hotpath", description=__doc__.split("\n")[0])
    p.add_argument("--target", choices=("gateway", "null"), default="gateway")
    p.add_argument("--config", default=str(ROOT / "bench" / "gateway.yaml"))
    p.add_argument("--scenario", choices=("chat", "stream", "paced"), default="chat")
    p.add_argument(
        "--pace-ms", type=float, default=None,
        help="paced: ms before each chunk (default: bench.run's 1; use ~40 with --callgrind)",
    )  # fmt: skip
    p.add_argument("--n", type=int, default=2000, help="measured requests")
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--conc", type=int, default=1, help="requests in flight")
    p.add_argument("--chunks", type=int, default=20)
    p.add_argument("--profile", help="write cProfile stats here and print the top functions")
    p.add_argument("--top", type=int, default=40)
    p.add_argument("--callgrind", action="store_true", help="instructions per request")
    p.add_argument("--keep-callgrind", help="with --callgrind: copy callgrind's output here")
    p.add_argument("--upstream", help="use this running fake upstream (http://host:port)")
    args = p.parse_args(argv)
    if args.callgrind:
        _callgrind(args, argv)
        return
    proc = None
    upstream = args.upstream
    if upstream is None:
        port = free_port()
        proc = _start_fake(port, args.chunks)
        upstream = f"http://127.0.0.1:{port}"
    os.environ["BENCH_UPSTREAM_URL"] = f"{upstream}/v1"
    os.environ.setdefault("BENCH_REQUEST_LOG", os.devnull)
    if os.environ.get("HOTPATH_CALLGRIND_LIB"):
        # Under valgrind the driver runs ~50x slower, so requests last far longer in wall time
        # and would start the disconnect watch (after 0.1 s of wall time) that real requests,
        # over in a few ms, never do: stretch its delay by the same factor.
        import gateway.disconnect

        gateway.disconnect.WATCH_AFTER_S *= 50
    try:
        import uvloop

        uvloop.run(_main(args, upstream))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(10)


def _start_fake(port: int, chunks: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.fake_upstream", "--port", str(port), "--record", "0",
         "--chunks", str(chunks)],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    _wait_port(port)
    return proc


def _wait_port(port: int, timeout: float = 20.0) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise SystemExit(f"fake upstream did not start on port {port}")


if __name__ == "__main__":
    main()
