"""One benchmark run on loopback: direct upstream vs the null proxy vs the gateway.

    python -m bench.run            # ~5 s per cell
    python -m bench.run --quick    # ~2 s per cell (wrk counts whole seconds)
    python -m bench.run --targets direct,null --scenarios chat --conc 1,32 --duration 3
    python -m bench.run --rounds 3 # every cell three times, interleaved; medians and the spread

Starts the fake upstream, the null proxy and the gateway as separate processes on free ports,
sends the same requests to each, prints a Markdown table and writes JSON to ``bench/results/``.
See docs/bench.md for what the columns mean.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import importlib.util
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from bench.load import LoadResult, have_wrk, run_load

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
#: Each request's prompt differs (bench.load replaces the counter), as real prompts do.
PROMPT = "Say hello in one short sentence, please. (request %REQ_NUM%)"
TARGETS = ("direct", "null", "gateway")
DEMO_KEY = "sk-demo-LocalOnlyNeverDeployThisKey"
SCENARIOS = ("chat", "stream")
#: Opt-in scenarios (``--scenarios chat,stream,paced``): ``paced`` is ``stream`` with the fake
#: pausing PACED_DELAY_MS before each content chunk, as a model generating tokens does, so every
#: event reaches the proxy in its own read. Its req/s is bound by the pauses; compare CPU/req.
EXTRA_SCENARIOS = ("paced",)
PACED_DELAY_MS = 1


def request_body(scenario: str) -> bytes:
    body: dict[str, Any] = {
        "model": "bench",
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": 64,
    }
    if scenario in ("stream", "paced"):
        # The gateway asks for the usage chunk anyway; ask everywhere so the bytes match.
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return json.dumps(body).encode()


def scenario_headers(scenario: str) -> dict[str, str]:
    """Request headers a scenario adds for every target (the proxies pass them on to the fake)."""
    return {"x-fake-delay-ms": str(PACED_DELAY_MS)} if scenario == "paced" else {}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclasses.dataclass
class Server:
    name: str
    url: str
    proc: subprocess.Popen[bytes]
    log: Path


def _wait_ready(server: Server, headers: dict[str, str], timeout: float = 30) -> None:
    """Until one real request per scenario succeeds with the expected shape."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            break
        try:
            for scenario in SCENARIOS:
                r = httpx.post(
                    server.url,
                    content=request_body(scenario),
                    headers={"content-type": "application/json", **headers},
                    timeout=5,
                )
                if r.status_code != 200:
                    raise RuntimeError(f"{scenario}: HTTP {r.status_code}: {r.text[:300]}")
                if scenario == "stream" and not r.text.endswith("data: [DONE]\n\n"):
                    raise RuntimeError(f"stream did not end with [DONE]: {r.text[-200:]!r}")
            return
        except (httpx.HTTPError, RuntimeError) as e:
            last = str(e)
            time.sleep(0.2)
    tail = server.log.read_text(errors="replace")[-2000:] if server.log.exists() else ""
    raise SystemExit(f"{server.name} did not become ready: {last}\n--- {server.log} ---\n{tail}")


@contextlib.contextmanager
def servers(args: argparse.Namespace, logdir: Path) -> Iterator[dict[str, Server]]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    pin = ["taskset", "-c", args.server_cpus] if args.server_cpus else []
    started: dict[str, Server] = {}

    def spawn(name: str, cmd: list[str], url: str, extra_env: dict[str, str] | None = None) -> None:
        log = logdir / f"{name}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [*pin, *cmd],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**env, **(extra_env or {})},
                cwd=ROOT,
            )
        started[name] = Server(name, url, proc, log)

    try:
        up = free_port()
        # --record 0: the request log would grow the fake's memory for no reason here.
        spawn("direct", [sys.executable, "-m", "gateway.fake_upstream", "--port", str(up),
                         "--record", "0", "--chunks", str(args.chunks)],
              f"http://127.0.0.1:{up}/v1/chat/completions")  # fmt: skip
        _wait_ready(started["direct"], {})
        if "null" in args.targets:
            port = free_port()
            spawn("null", [sys.executable, "-m", "bench.null_proxy", "--port", str(port),
                           "--upstream", f"http://127.0.0.1:{up}",
                           "--workers", str(args.workers)],
                  f"http://127.0.0.1:{port}/v1/chat/completions")  # fmt: skip
            _wait_ready(started["null"], {})
        if "gateway" in args.targets:
            port = free_port()
            spawn("gateway", [sys.executable, "-m", "gateway.cli", "serve", "--config",
                              str(args.config), "--port", str(port),
                              "--workers", str(args.workers)],
                  f"http://127.0.0.1:{port}/v1/chat/completions",
                  {"BENCH_UPSTREAM_URL": f"http://127.0.0.1:{up}/v1",
                   "BENCH_REQUEST_LOG": str(logdir / "gateway-requests.jsonl")})  # fmt: skip
            _wait_ready(started["gateway"], args.gateway_headers)
        yield started
    finally:
        for server in started.values():
            server.proc.terminate()
        for server in started.values():
            try:
                server.proc.wait(10)
            except subprocess.TimeoutExpired:
                server.proc.kill()


def _stat(pid: int) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name (None: no such process)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process and its descendants (``--workers``: uvicorn's
    supervisor and its worker processes) have used so far (Linux ``/proc``; NaN elsewhere)."""
    if _stat(pid) is None:
        return float("nan")
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None:
            children.setdefault(int(stat[1]), []).append(int(entry.name))  # (by parent pid)
    ticks = 0
    todo = [pid]
    while todo:
        proc = todo.pop()
        stat = _stat(proc)
        if stat is not None:
            ticks += int(stat[11]) + int(stat[12])
        todo.extend(children.get(proc, ()))
    return ticks / os.sysconf("SC_CLK_TCK")


def markdown(rows: list[dict[str, Any]]) -> str:
    direct = {(r["scenario"], r["conc"]): r for r in rows if r["target"] == "direct"}
    out = [
        "| target | scenario | conc | req/s | p50 ms | p99 ms | added p50 ms | added p99 ms "
        "| CPU µs/req | errors |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in rows:
        base = direct.get((r["scenario"], r["conc"]))
        if base is None or r["target"] == "direct":
            added = ("", "")
        else:
            added = (f"{r['p50_ms'] - base['p50_ms']:+.2f}", f"{r['p99_ms'] - base['p99_ms']:+.2f}")
        out.append(
            f"| {r['target']} | {r['scenario']} | {r['conc']} | {r['rps']:.0f} "
            f"| {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {added[0]} | {added[1]} "
            f"| {r['cpu_us']:.0f} | {r['errors']} |"
        )
    return "\n".join(out)


def median_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per cell (target, scenario, conc) over the rounds: the median of each number
    (taken separately), errors summed, in the order the cells first ran."""
    cells: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for r in rows:
        cells.setdefault((r["target"], r["scenario"], r["conc"]), []).append(r)
    out = []
    for (target, scenario, conc), rs in cells.items():
        row = {"target": target, "scenario": scenario, "conc": conc, "rounds": len(rs),
               "errors": sum(r["errors"] for r in rs)}  # fmt: skip
        for key in ("rps", "p50_ms", "p99_ms", "cpu_us"):
            row[key] = statistics.median(r[key] for r in rs)
        out.append(row)
    return out


def summary(rows: list[dict[str, Any]]) -> str:
    """Gateway against the null proxy of the same round, per cell: share of the req/s and
    CPU per request. Over several rounds, the medians and every round's share (the null
    proxy's own req/s moves most between rounds)."""
    by = {(r.get("round", 0), r["target"], r["scenario"], r["conc"]): r for r in rows}
    shares: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for (rnd, target, scenario, conc), g in by.items():
        n = by.get((rnd, "null", scenario, conc))
        if target == "gateway" and n is not None:
            shares.setdefault((scenario, conc), []).append(
                (g["rps"] / n["rps"], g["cpu_us"] / n["cpu_us"])
            )
    lines = []
    for (scenario, conc), xs in shares.items():
        rps = f"{statistics.median(x for x, _ in xs):.0%} of the req/s"
        if len(xs) > 1:
            rps += f" (median; rounds: {', '.join(f'{x:.0%}' for x, _ in xs)})"
        lines.append(
            f"gateway/null {scenario} conc {conc}: {rps}, "
            f"{statistics.median(c for _, c in xs):.2f}x the CPU per request"
        )
    return "\n".join(lines)


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="2 s per cell instead of 5")
    p.add_argument("--duration", type=float, help="seconds per cell (overrides --quick)")
    p.add_argument("--targets", default=",".join(TARGETS), help="direct,null,gateway")
    p.add_argument(
        "--scenarios", default=",".join(SCENARIOS),
        help="chat,stream (the default) and paced (streamed, a 1 ms pause before each chunk)",
    )  # fmt: skip
    p.add_argument("--conc", default="1,32", help="concurrency levels, e.g. 1,32")
    p.add_argument("--chunks", type=int, default=20, help="content chunks per streamed answer")
    p.add_argument("--tool", choices=("auto", "wrk", "python"), default="auto")
    p.add_argument("--config", type=Path, default=ROOT / "bench" / "gateway.yaml")
    p.add_argument(
        "--gateway-header", action="append", default=[], metavar="NAME:VALUE",
        help="extra header for gateway requests (e.g. an API key when auth is in the pipeline)",
    )  # fmt: skip
    p.add_argument("--load-cpus", help="taskset CPU list for the load tool, e.g. 0")
    p.add_argument("--server-cpus", help="taskset CPU list for the servers, e.g. 1")
    p.add_argument(
        "--rounds", type=int, default=1,
        help="measure every cell this many times, interleaved (all cells, then all again); "
        "the table shows medians, and each round's gateway/null share is printed",
    )  # fmt: skip
    p.add_argument(
        "--workers", type=int, default=1,
        help="processes for the null proxy and the gateway alike (gateway serve --workers)",
    )  # fmt: skip
    p.add_argument("--out", type=Path, help="JSON results file (default bench/results/<time>.json)")
    args = p.parse_args(argv)
    args.targets = _csv(args.targets)
    args.scenarios = _csv(args.scenarios)
    args.conc = [int(c) for c in _csv(args.conc)]
    bad = [t for t in args.targets if t not in TARGETS] + [
        s for s in args.scenarios if s not in SCENARIOS + EXTRA_SCENARIOS
    ]
    if bad:
        p.error(f"unknown target/scenario {bad[0]!r}")
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    if args.workers < 1:
        p.error("--workers must be at least 1")
    if "direct" not in args.targets:
        args.targets.insert(0, "direct")  # the baseline every "added" column needs
    # bench/gateway.yaml runs the demo pipeline, whose auth plugin knows the demo key.
    args.gateway_header = args.gateway_header or [f"Authorization: Bearer {DEMO_KEY}"]
    args.gateway_headers = dict(h.split(":", 1) for h in args.gateway_header)
    args.gateway_headers = {k.strip(): v.strip() for k, v in args.gateway_headers.items()}
    args.duration = args.duration or (2.0 if args.quick else 5.0)
    return args


def measure_round(
    args: argparse.Namespace, procs: dict[str, Server], tool: str, rnd: int
) -> list[dict[str, Any]]:
    """Every cell once: per scenario and target, a warm-up, then each concurrency."""
    rows = []
    for scenario in args.scenarios:
        body = request_body(scenario)
        for target in args.targets:
            server = procs[target]
            headers = {
                **(args.gateway_headers if target == "gateway" else {}),
                **scenario_headers(scenario),
            }
            # Warm-up (connections, caches, first-call imports); not recorded.
            run_load(server.url, body, headers, 4, 1.0, tool, args.load_cpus)
            for conc in args.conc:
                # CPU per request of the server under test (for direct: the fake itself):
                # unlike req/s, barely moved by whatever else shares the machine.
                cpu = cpu_seconds(server.proc.pid)
                res: LoadResult = run_load(
                    server.url, body, headers, conc, args.duration, tool, args.load_cpus
                )
                cpu = cpu_seconds(server.proc.pid) - cpu
                row = {"target": target, "scenario": scenario, "round": rnd,
                       **dataclasses.asdict(res),
                       "cpu_us": cpu / max(1, res.requests) * 1e6}  # fmt: skip
                rows.append(row)
                print(
                    f"  r{rnd + 1} {target:8} {scenario:6} c={conc:<3} {res.rps:8.0f} req/s "
                    f"p50 {res.p50_ms:7.2f} ms  p99 {res.p99_ms:7.2f} ms  "
                    f"cpu {row['cpu_us']:5.0f} us/req  errors {res.errors}",
                    file=sys.stderr,
                )
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if "gateway" in args.targets and importlib.util.find_spec("gateway.cli") is None:
        print("gateway/cli.py is missing: skipping the gateway target", file=sys.stderr)
        args.targets.remove("gateway")
    tool = args.tool if args.tool != "auto" else ("wrk" if have_wrk() else "python")
    if tool == "python" and args.load_cpus:
        os.sched_setaffinity(0, {int(c) for c in _csv(args.load_cpus)})
    rows: list[dict[str, Any]] = []
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp, servers(args, Path(tmp)) as procs:
        for rnd in range(args.rounds):
            rows += measure_round(args, procs, tool, rnd)
    if args.workers > 1:
        print(f"Null proxy and gateway with {args.workers} worker processes each.\n")
    if args.rounds > 1:
        print(f"Medians over {args.rounds} rounds:\n")
    print(markdown(median_rows(rows)))  # (one round: the rows as measured)
    if summary(rows):
        print("\n" + summary(rows))
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = args.out or RESULTS / f"bench-{dt.datetime.now():%Y%m%d-%H%M%S}.json"
    meta = {
        "time": dt.datetime.now().isoformat(timespec="seconds"),
        "tool": tool,
        "duration_s": args.duration,
        "rounds": args.rounds,
        "workers": args.workers,
        "chunks": args.chunks,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "load_cpus": args.load_cpus,
        "server_cpus": args.server_cpus,
        "config": str(args.config),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
    }
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"\nresults: {out}", file=sys.stderr)
    print(f"load average (1 min) before {load_before[0]:.2f}, after {meta['loadavg_after'][0]:.2f} "
          f"on {os.cpu_count()} CPUs", file=sys.stderr)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
