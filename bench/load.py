"""Load generation: ``wrk`` when installed (C, leaves the CPU to the servers), else asyncio.

Both return the same ``LoadResult``: completed requests per second and the latency of whole
responses (for a stream: until the last byte, ``data: [DONE]``) at p50 and p99. Each keeps
``conc`` connections busy for ``duration`` seconds, one request after another on each.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import random
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import aiohttp


@dataclasses.dataclass
class LoadResult:
    tool: str
    conc: int
    duration_s: float
    requests: int
    errors: int
    rps: float
    p50_ms: float
    p99_ms: float


#: In a request body, replaced by a different zero-padded number in each request (same width,
#: so the length never changes): every prompt is new, as in real traffic, so no cache along the
#: way (token counts, guard verdicts, responses) can make the benchmark's one prompt free.
COUNTER = b"%REQ_NUM%"


def counter_start() -> int:
    """Where a run's numbers start: far from the last run's, so nothing cached carries over."""
    return random.randrange(26**8)


def counter_word(n: int) -> bytes:
    """``n`` as 9 lower-case letters (base 26). Letters, not digits: runs of digits make the
    secrets detectors look closer (card and phone numbers), which a typical prompt does not."""
    out = bytearray(9)
    for i in range(8, -1, -1):
        n, d = divmod(n, 26)
        out[i] = 97 + d
    return bytes(out)


def numbered(body: bytes, n: int) -> bytes:
    """``body`` with its :data:`COUNTER` replaced by ``n`` (as :func:`counter_word`)."""
    return body.replace(COUNTER, counter_word(n))


_LUA = """
local f = assert(io.open("{body}", "rb"))
local body = f:read("*a")
f:close()
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
{headers}
local at = string.find(body, "{counter}", 1, true)
if at then
  local head, tail = string.sub(body, 1, at - 1), string.sub(body, at + {counter_len})
  local n = {start}
  -- n as 9 lower-case letters, as bench.load.counter_word writes it.
  local function word(v)
    local t = {{}}
    for i = 9, 1, -1 do
      local d = v % 26
      t[i] = string.char(97 + d)
      v = (v - d) / 26
    end
    return table.concat(t)
  end
  request = function()
    n = n + 1
    return wrk.format(nil, nil, nil, head .. word(n) .. tail)
  end
else
  wrk.body = body
end
"""

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not m:
        raise ValueError(f"unparsable wrk latency {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def _lua_str(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def parse_wrk(output: str, conc: int, duration: float) -> LoadResult:
    """Read ``wrk --latency`` output: totals, the latency distribution and the error lines."""
    rps = re.search(r"Requests/sec:\s+([\d.]+)", output)
    total = re.search(r"(\d+) requests in", output)
    p50 = re.search(r"^\s+50%\s+(\S+)", output, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", output, re.M)
    if not (rps and total and p50 and p99):
        raise RuntimeError(f"could not parse wrk output:\n{output}")
    errors = 0
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    if non2xx:
        errors += int(non2xx.group(1))
    sock = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    if sock:
        errors += sum(int(x) for x in sock.groups())
    return LoadResult(
        "wrk", conc, duration, int(total.group(1)), errors, float(rps.group(1)),
        _ms(p50.group(1)), _ms(p99.group(1)),
    )  # fmt: skip


def run_wrk(
    url: str,
    body: bytes,
    headers: dict[str, str],
    conc: int,
    duration: float,
    cpus: str | None = None,
) -> LoadResult:
    """One wrk thread (one core) is plenty for Python servers at a few thousand req/s.

    wrk takes whole seconds, so ``duration`` is rounded up.
    """
    duration = float(max(1, math.ceil(duration)))
    with tempfile.TemporaryDirectory(prefix="bench-wrk-") as tmp:
        body_path = Path(tmp, "body.json")
        body_path.write_bytes(body)
        lua = "\n".join(f"wrk.headers[{_lua_str(k)}] = {_lua_str(v)}" for k, v in headers.items())
        script = Path(tmp, "post.lua")
        script.write_text(
            _LUA.format(
                body=body_path, headers=lua, counter=COUNTER.decode(),
                counter_len=len(COUNTER), start=counter_start(),
            )
        )  # fmt: skip
        cmd = ["wrk", "-t1", f"-c{conc}", f"-d{int(duration)}s", "--latency", "--timeout", "10s"]
        cmd += ["-s", str(script), url]
        if cpus:
            cmd = ["taskset", "-c", cpus, *cmd]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 30)
    if out.returncode != 0:
        raise RuntimeError(f"wrk failed ({out.returncode}): {out.stderr.strip()}")
    return parse_wrk(out.stdout, conc, duration)


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile (what HdrHistogram in wrk reports, near enough)."""
    if not sorted_values:
        return float("nan")
    rank = max(1, min(len(sorted_values), math.ceil(q * len(sorted_values) / 100)))
    return sorted_values[rank - 1]


async def run_python(
    url: str, body: bytes, headers: dict[str, str], conc: int, duration: float
) -> LoadResult:
    """Fallback: ``conc`` asyncio workers on one aiohttp session, each reading whole bodies."""
    latencies: list[float] = []
    errors = 0
    hdrs = {"content-type": "application/json", **headers}
    connector = aiohttp.TCPConnector(limit=conc, force_close=False)
    n = counter_start()
    async with aiohttp.ClientSession(connector=connector) as session:
        start = time.perf_counter()
        end = start + duration

        async def worker() -> None:
            nonlocal errors, n
            while time.perf_counter() < end:
                t0 = time.perf_counter()
                n += 1
                try:
                    async with session.post(url, data=numbered(body, n), headers=hdrs) as resp:
                        await resp.read()
                        ok = resp.status < 300
                except aiohttp.ClientError:
                    ok = False
                latencies.append((time.perf_counter() - t0) * 1e3)
                errors += not ok

        await asyncio.gather(*(worker() for _ in range(conc)))
        elapsed = time.perf_counter() - start
    latencies.sort()
    return LoadResult(
        "python", conc, duration, len(latencies), errors, len(latencies) / elapsed,
        percentile(latencies, 50), percentile(latencies, 99),
    )  # fmt: skip


def have_wrk() -> bool:
    return shutil.which("wrk") is not None


def run_load(
    url: str,
    body: bytes,
    headers: dict[str, str],
    conc: int,
    duration: float,
    tool: str = "auto",
    cpus: str | None = None,
) -> LoadResult:
    if tool == "wrk" or (tool == "auto" and have_wrk()):
        return run_wrk(url, body, headers, conc, duration, cpus)
    return asyncio.run(run_python(url, body, headers, conc, duration))
