"""limit plugin against a real Redis: several plugin instances (separate connections, as
separate replicas have) share counters exactly; Redis outages follow ``on_store_error``.

Uses ``REDIS_URL`` (default ``redis://127.0.0.1:6379/14``) with a key prefix unique to each
test, deleted afterwards. Outage tests start their own ``redis-server`` on a free port.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from limits import RateLimitItemPerMinute
from limits.aio.storage import RedisStorage
from limits.aio.strategies import MovingWindowRateLimiter
from prometheus_client import REGISTRY

from gateway.context import RequestContext
from gateway.errors import QuotaExceededError, RateLimitError, ServiceUnavailableError
from plugins.limit import LimitPlugin
from plugins.limit.store_redis import RedisStore, StoreUnavailable

from ..helpers import free_port
from .test_limit_helpers import Clock, finish, make_ctx, make_plugin

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/14")


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    p = f"gwlimit-test-{uuid.uuid4().hex[:12]}"
    yield p
    client = aioredis.Redis.from_url(REDIS_URL)
    keys = [k async for k in client.scan_iter(match=f"{p}:*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


@contextlib.asynccontextmanager
async def plugins(
    n: int, clock: Callable[[], float] | None = None, **config: Any
) -> AsyncIterator[list[LimitPlugin]]:
    """``n`` independent plugin instances, each with its own Redis connection pool."""
    started = [make_plugin(clock, **config) for _ in range(n)]
    for p in started:
        await p.startup(None)
    try:
        yield started
    finally:
        for p in started:
            await p.shutdown()


#: For the exactness tests against the shared Redis: on a loaded machine a 0.25 s store timeout
#: can pass, and the default fail-open would then admit beyond the limit.
PATIENT = {"socket_timeout_s": 5.0}


async def _attempt(plugin: LimitPlugin, **ctx_args: Any) -> RateLimitError | None:
    try:
        await plugin.on_request(make_ctx(**ctx_args))
    except RateLimitError as e:
        return e
    return None


@pytest.mark.anyio
async def test_three_instances_admit_exactly_the_rpm_limit(prefix: str) -> None:
    limit = 20
    rules = [{"scope": "user", "rpm": limit}]
    async with plugins(3, store=REDIS_URL, key_prefix=prefix, rules=rules, **PATIENT) as ps:
        results = await asyncio.gather(*(_attempt(ps[i % 3]) for i in range(5 * limit)))
    admitted = [r for r in results if r is None]
    refused = [r for r in results if r is not None]
    assert len(admitted) == limit
    assert len(refused) == 4 * limit
    assert all(r.status == 429 and 1 <= int(r.headers["retry-after"]) <= 60 for r in refused)


@pytest.mark.anyio
async def test_request_window_is_the_limits_librarys_moving_window(prefix: str) -> None:
    # Same strategy on the same keys: limits' own reader sees what we counted.
    rules = [{"scope": "user", "rpm": 5}]
    async with plugins(1, time.time, store=REDIS_URL, key_prefix=prefix, rules=rules) as ps:
        for _ in range(3):
            await ps[0].on_request(make_ctx("alice"))
    storage = RedisStorage(
        REDIS_URL.replace("redis://", "async+redis://"), implementation="redispy", key_prefix=prefix
    )
    stats = await MovingWindowRateLimiter(storage).get_window_stats(
        RateLimitItemPerMinute(5, namespace="rpm"), "user/alice"
    )
    await storage.bridge.storage.aclose()  # type: ignore[attr-defined]
    assert stats.remaining == 2


@pytest.mark.anyio
async def test_tpm_reservations_across_instances_then_reconcile(prefix: str) -> None:
    rules = [{"scope": "tenant", "tpm": 2000}]
    async with plugins(3, store=REDIS_URL, key_prefix=prefix, rules=rules, **PATIENT) as ps:
        ctxs = [make_ctx(f"u{i}", max_tokens=400) for i in range(12)]
        results = await asyncio.gather(
            *(ps[i % 3].on_request(c) for i, c in enumerate(ctxs)), return_exceptions=True
        )
        ok = [c for c, r in zip(ctxs, results, strict=True) if r is None]
        per = ok[0].log["limit"]["reserved_tokens"]  # (the prompt's byte count + 400)
        assert len(ok) == 2000 // per == 4  # none finished: the 5th would overshoot
        assert all(isinstance(r, RateLimitError) for r in results if r is not None)
        for c in ok:  # each used 20 of its ~410
            await ps[1].on_response(finish(c, 10, 10))
        probe = make_ctx("x", max_tokens=400)
        await ps[2].on_request(probe)
        assert probe.response_headers["x-ratelimit-remaining-tokens"] == str(2000 - 80 - per)


@pytest.mark.anyio
async def test_parallel_across_instances_and_release(prefix: str) -> None:
    rules = [{"scope": "user", "max_parallel": 3}]
    async with plugins(2, store=REDIS_URL, key_prefix=prefix, rules=rules, **PATIENT) as ps:
        ctxs = [make_ctx() for _ in range(10)]
        results = await asyncio.gather(
            *(ps[i % 2].on_request(c) for i, c in enumerate(ctxs)), return_exceptions=True
        )
        ok = [c for c, r in zip(ctxs, results, strict=True) if r is None]
        assert len(ok) == 3
        await ps[0].on_response(finish(ok[0], 1, 1))  # completed
        await ps[1].on_response(finish(ok[1], status=502, usage=False))  # upstream error
        await ps[0].on_response(finish(ok[2], 1, 0, status=499, disconnected=True))
        again = [make_ctx() for _ in range(4)]
        results = await asyncio.gather(
            *(ps[i % 2].on_request(c) for i, c in enumerate(again)), return_exceptions=True
        )
        assert sum(r is None for r in results) == 3


@pytest.mark.anyio
async def test_budget_shared_across_instances_resets_next_day(prefix: str) -> None:
    clock = Clock(1_767_225_600.0 + 23 * 3600)  # 23:00 UTC
    rules = [{"scope": "tenant", "budget_usd": {"day": 0.01, "month": 1.0}}]
    async with plugins(2, clock, store=REDIS_URL, key_prefix=prefix, rules=rules, **PATIENT) as ps:
        ctx = make_ctx()
        await ps[0].on_request(ctx)
        await ps[0].on_response(finish(ctx, 1000, 0))  # $0.01
        with pytest.raises(QuotaExceededError) as e:
            await ps[1].on_request(make_ctx("bob"))
        assert e.value.code == "insufficient_quota"
        assert e.value.headers["retry-after"] == "3600"
        clock.advance(3600)
        await ps[1].on_request(make_ctx("bob"))
        client = aioredis.Redis.from_url(REDIS_URL, decode_responses=True)
        month = await client.get(f"{prefix}:usd/tenant/acme/month/2026-01")
        await client.aclose()
        assert float(month) == pytest.approx(0.01)


@pytest.mark.anyio
async def test_budget_holds_are_shared_across_instances_and_lapse(prefix: str) -> None:
    """Holds of requests in flight count on every replica; a replica that dies mid-request
    leaves holds that lapse after ``parallel_slot_ttl_s``."""
    clock = Clock()
    rules = [{"scope": "tenant", "budget_usd": {"day": 1.0}}]
    async with plugins(
        2, clock, store=REDIS_URL, key_prefix=prefix, rules=rules, parallel_slot_ttl_s=60,
        **PATIENT,
    ) as ps:  # fmt: skip
        burst = [make_ctx(f"u{i}", max_tokens=10_000) for i in range(10)]  # $0.20011 each
        results = await asyncio.gather(
            *(ps[i % 2].on_request(c) for i, c in enumerate(burst)), return_exceptions=True
        )
        admitted = [c for c, r in zip(burst, results, strict=True) if r is None]
        assert len(admitted) == 5
        assert all(isinstance(r, RateLimitError) for r in results if r is not None)
        await ps[1].on_response(finish(admitted[0], 10, 1000))  # $0.0201: room again
        await ps[0].on_request(make_ctx("late", max_tokens=10_000))
        with pytest.raises(RateLimitError, match="held by requests in flight"):
            await ps[1].on_request(make_ctx("later", max_tokens=10_000))
        clock.advance(61)  # those requests' replica "died": their holds lapse
        for i in range(4):
            await ps[i % 2].on_request(make_ctx(f"next{i}", max_tokens=10_000))
        # The sum kept beside the holds is theirs: the four just admitted.
        client = aioredis.Redis.from_url(REDIS_URL, decode_responses=True)
        (key,) = [k async for k in client.scan_iter(match=f"{prefix}:usd/*/held")]
        holds = await client.hgetall(key)
        await client.aclose()
        total = float(holds.pop("=total"))
        assert len(holds) == 4 and total == pytest.approx(4 * 0.20011)


@pytest.mark.anyio
async def test_every_refusal_carries_the_request_and_token_headers(prefix: str) -> None:
    rules = [{"scope": "user", "rpm": 3, "tpm": 100_000, "max_parallel": 1}]
    async with plugins(2, store=REDIS_URL, key_prefix=prefix, rules=rules, **PATIENT) as ps:
        first = make_ctx()
        await ps[0].on_request(first)
        reserved = first.log["limit"]["reserved_tokens"]
        busy = make_ctx()
        with pytest.raises(RateLimitError, match="in flight"):
            await ps[1].on_request(busy)
        h = busy.response_headers
        assert (h["x-ratelimit-limit-requests"], h["x-ratelimit-remaining-requests"]) == (
            "3", "2")  # fmt: skip
        assert h["x-ratelimit-remaining-tokens"] == str(100_000 - reserved)
        await ps[0].on_response(finish(first, 10, 10))
        for i in range(2):
            ctx = make_ctx()
            await ps[i].on_request(ctx)
            await ps[i].on_response(finish(ctx, 10, 10))
        over = make_ctx()
        with pytest.raises(RateLimitError, match="requests per minute"):
            await ps[1].on_request(over)
        h = over.response_headers
        assert h["x-ratelimit-remaining-requests"] == "0"
        assert h["x-ratelimit-remaining-tokens"] == str(100_000 - 60)


# --- outages ------------------------------------------------------------------------------------


class OwnRedis:
    """A redis-server of our own, to kill and restart (never the shared one on 6379)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        import redis

        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis(port=self.port, socket_timeout=0.2).ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(5)


@pytest.fixture
def own_redis() -> Iterator[OwnRedis]:
    server = OwnRedis()
    server.start()
    try:
        yield server
    finally:
        assert server.proc is not None
        if server.proc.poll() is None:
            server.proc.send_signal(signal.SIGCONT)
            server.kill()


def _store_errors(op: str) -> float:
    return REGISTRY.get_sample_value("gateway_limit_store_errors_total", {"op": op}) or 0.0


async def _timed(plugin: LimitPlugin) -> tuple[float, BaseException | None]:
    start = time.perf_counter()
    try:
        await plugin.on_request(make_ctx())
    except Exception as e:
        return time.perf_counter() - start, e
    return time.perf_counter() - start, None


@pytest.mark.anyio
async def test_redis_killed_fail_open_admits_counts_and_recovers(own_redis: OwnRedis) -> None:
    async with plugins(
        1, store=own_redis.url, on_store_error="fail_open", retry_store_after_s=0.2,
        rules=[{"scope": "user", "rpm": 2, "max_parallel": 5}],
    ) as ps:  # fmt: skip
        plugin = ps[0]
        held = make_ctx()
        await plugin.on_request(held)
        await plugin.on_request(make_ctx())
        with pytest.raises(RateLimitError):
            await plugin.on_request(make_ctx())
        own_redis.kill()
        before = _store_errors("admit")
        for _ in range(5):  # over the limit, but admitted: fail open, and promptly
            elapsed, err = await _timed(plugin)
            assert err is None and elapsed < 1.5
        assert _store_errors("admit") - before == 5
        settle_before = _store_errors("settle")
        await plugin.on_response(finish(held, 1, 1))  # never raises
        assert _store_errors("settle") - settle_before == 1
        own_redis.start()  # same port, empty
        await asyncio.sleep(0.3)
        await plugin.on_request(make_ctx())
        await plugin.on_request(make_ctx())
        with pytest.raises(RateLimitError):  # limits hold again
            await plugin.on_request(make_ctx())


@pytest.mark.anyio
async def test_redis_killed_fail_closed_503_then_recovers(own_redis: OwnRedis) -> None:
    async with plugins(
        1, store=own_redis.url, on_store_error="fail_closed", retry_store_after_s=0.2,
        rules=[{"scope": "user", "rpm": 1}],
    ) as ps:  # fmt: skip
        plugin = ps[0]
        await plugin.on_request(make_ctx())
        own_redis.kill()
        for _ in range(3):
            elapsed, err = await _timed(plugin)
            assert isinstance(err, ServiceUnavailableError) and elapsed < 1.5
            assert err.status == 503
        own_redis.start()
        await asyncio.sleep(0.3)
        elapsed, err = await _timed(plugin)
        assert err is None
        elapsed, err = await _timed(plugin)
        assert isinstance(err, RateLimitError)


@pytest.mark.anyio
async def test_settlements_missed_in_a_redis_blip_are_retried(own_redis: OwnRedis) -> None:
    """Redis stops answering while two requests end: the first settlement times out (it may
    still be applied when Redis wakes, so only its slot is freed again), the second is skipped
    (the store is marked down) and is retried whole. Both slots come back within seconds, not
    after ``parallel_slot_ttl_s``, and no spend is counted twice."""
    import redis

    async with plugins(
        1, store=own_redis.url, retry_store_after_s=0.5, socket_timeout_s=0.2,
        on_store_error="fail_closed",
        rules=[{"scope": "user", "max_parallel": 2, "budget_usd": {"day": 100}}],
    ) as ps:  # fmt: skip
        plugin = ps[0]
        a, b = make_ctx(), make_ctx()
        await plugin.on_request(a)
        await plugin.on_request(b)
        with pytest.raises(RateLimitError, match="in flight"):
            await plugin.on_request(make_ctx())
        assert own_redis.proc is not None
        own_redis.proc.send_signal(signal.SIGSTOP)
        try:
            await plugin.on_response(finish(a, 1000, 1000))  # $0.03: times out
            await plugin.on_response(finish(b, 2000, 2000))  # $0.06: skipped, marked down
        finally:
            own_redis.proc.send_signal(signal.SIGCONT)
        admitted = 0
        deadline = time.monotonic() + 10
        while admitted < 2 and time.monotonic() < deadline:  # both slots come back
            try:
                await plugin.on_request(make_ctx())
                admitted += 1
            except (RateLimitError, ServiceUnavailableError):  # (503: marked down a while)
                await asyncio.sleep(0.1)
        assert admitted == 2
        client = redis.Redis(port=own_redis.port)
        (key,) = [k for k in client.keys("*usd*") if b"/held" not in k]
        # Holds: the two admitted since, still in flight (and their sum); a's and b's ended.
        holds = client.hgetall(key + b"/held")
        total = float(holds.pop(b"=total"))
        assert len(holds) == 2 and total == pytest.approx(sum(float(v) for v in holds.values()))
        spent = float(client.get(key) or 0)
        # b's spend is in; a's is in if Redis ran its timed-out call on waking; never twice.
        assert round(spent, 6) in (0.06, 0.09)


@pytest.mark.anyio
async def test_hung_redis_does_not_hang_requests(own_redis: OwnRedis) -> None:
    async with plugins(
        1, store=own_redis.url, on_store_error="fail_closed", retry_store_after_s=0.0,
        rules=[{"scope": "user", "rpm": 100}],
    ) as ps:  # fmt: skip
        await ps[0].on_request(make_ctx())
        assert own_redis.proc is not None
        own_redis.proc.send_signal(signal.SIGSTOP)  # accepts connections, never answers
        try:
            results = await asyncio.gather(*(_timed(ps[0]) for _ in range(5)))
        finally:
            own_redis.proc.send_signal(signal.SIGCONT)
        for elapsed, err in results:
            assert isinstance(err, ServiceUnavailableError)
            assert elapsed < 1.5
        await asyncio.sleep(0.1)
        elapsed, err = await _timed(ps[0])
        assert err is None


@pytest.mark.anyio
async def test_a_burst_beyond_the_connection_pool_is_still_limited_exactly(prefix: str) -> None:
    """redis-py's default pool (100 connections) raised at once on the 101st concurrent
    command: a burst on a healthy Redis looked like an outage and was failed open (189 of 200
    admitted under rpm 20, measured). Commands now wait for a free connection."""
    from gateway import redis_client

    limit, burst = 20, redis_client.MAX_CONNECTIONS + 100
    rules = [{"scope": "user", "rpm": limit}]
    async with plugins(1, store=REDIS_URL, key_prefix=prefix, rules=rules, **PATIENT) as ps:
        results = await asyncio.gather(*(_attempt(ps[0]) for _ in range(burst)))
    assert sum(r is None for r in results) == limit
    assert all(r is None or r.status == 429 for r in results)  # no store error, no 503


async def _admit_until(plugin: LimitPlugin, seconds: float = 10.0) -> RequestContext:
    """Asks until admitted by the store (not failed open while it is marked down; refused
    while a slot is taken)."""
    deadline = time.monotonic() + seconds
    while True:
        ctx = make_ctx()
        try:
            await plugin.on_request(ctx)
            if ctx.log["limit"] != "store_unavailable":
                return ctx
            await plugin.on_response(finish(ctx))
        except (RateLimitError, ServiceUnavailableError):
            pass
        assert time.monotonic() < deadline, "not admitted in time"
        await asyncio.sleep(0.1)


@pytest.mark.anyio
@pytest.mark.parametrize("on_store_error", ["fail_closed", "fail_open"])
async def test_an_admission_that_timed_out_gives_back_its_slot_and_hold(
    own_redis: OwnRedis, on_store_error: str
) -> None:
    """Redis hangs during an admission: the client gives up, but Redis runs the script when it
    wakes, taking a concurrency slot and a budget hold. They used to stay taken for
    ``parallel_slot_ttl_s``; now they are released once Redis answers again."""
    import redis

    async with plugins(
        1, store=own_redis.url, retry_store_after_s=0.3, socket_timeout_s=0.2,
        on_store_error=on_store_error,
        rules=[{"scope": "user", "max_parallel": 1, "rpm": 100, "tpm": 100_000},
               {"scope": "tenant", "budget_usd": {"day": 100}}],
    ) as ps:  # fmt: skip
        plugin = ps[0]
        first = make_ctx()
        await plugin.on_request(first)
        await plugin.on_response(finish(first, 10, 10))
        assert own_redis.proc is not None
        own_redis.proc.send_signal(signal.SIGSTOP)
        try:
            lost = make_ctx()
            if on_store_error == "fail_closed":
                with pytest.raises(ServiceUnavailableError):
                    await plugin.on_request(lost)
            else:
                await plugin.on_request(lost)  # admitted without limits
        finally:
            own_redis.proc.send_signal(signal.SIGCONT)
        if on_store_error == "fail_open":
            await plugin.on_response(finish(lost, 10, 10))
        again = await _admit_until(plugin)  # the timed-out admission's slot came back
        with pytest.raises(RateLimitError, match="in flight"):  # and the limit still holds
            await plugin.on_request(make_ctx())
        client = redis.Redis(port=own_redis.port, decode_responses=True)
        (par,) = client.keys("*par/*")
        assert client.zcard(par) == 1
        (held,) = client.keys("*/held")
        holds = client.hgetall(held)
        holds.pop("=total")
        assert list(holds) == [again.scratch["limit"]["reservation"].slot_id]
        await plugin.on_response(finish(again, 10, 10))


@pytest.mark.anyio
async def test_an_admission_run_after_its_release_takes_nothing(prefix: str) -> None:
    """The release of a timed-out admission may reach Redis before the admission itself (it
    waits in the socket of a connection the client gave up on): the admission then does
    nothing, where it used to take a slot and a hold that nothing would give back."""
    rules = [{"scope": "user", "max_parallel": 1, "rpm": 5},
             {"scope": "tenant", "budget_usd": {"day": 100}}]  # fmt: skip
    async with plugins(1, store=REDIS_URL, key_prefix=prefix, rules=rules, **PATIENT) as ps:
        plugin = ps[0]
        store = plugin.store
        assert isinstance(store, RedisStore)
        plan = plugin.plan(make_ctx())
        now = plugin.clock()
        taken = store.reservation(plan, now=now, slot_id="s.1", tokens=10, reserve_usd=0.5)
        await store.release(taken, abandon_ttl=60)
        with pytest.raises(StoreUnavailable):
            await store.admit(plan, now=now, slot_id="s.1", tokens=10, slot_ttl=60,
                              reserve_usd=0.5)  # fmt: skip
        client = aioredis.Redis.from_url(REDIS_URL, decode_responses=True)
        keys = [k async for k in client.scan_iter(match=f"{prefix}:*")]
        await client.aclose()
        assert keys == [f"{prefix}:abandoned/s.1"]  # no request counted, no slot, no hold
        ctx = make_ctx()
        await plugin.on_request(ctx)  # other slots are not affected
        assert ctx.response_headers["x-ratelimit-remaining-requests"] == "4"


@pytest.mark.anyio
async def test_fail_open_requests_are_charged_to_budgets_when_they_end(
    own_redis: OwnRedis,
) -> None:
    """Requests admitted without the store (``fail_open``) used to be free: their spend was
    never recorded. It now is when they end: at once if Redis is back, else by the background
    retries."""
    import redis

    async with plugins(
        1, store=own_redis.url, on_store_error="fail_open", retry_store_after_s=0.2,
        rules=[{"scope": "tenant", "tpm": 100_000, "budget_usd": {"day": 100}}],
    ) as ps:  # fmt: skip
        plugin = ps[0]
        own_redis.kill()
        a, b = make_ctx(), make_ctx()
        await plugin.on_request(a)  # admitted without limits
        await plugin.on_request(b)
        own_redis.start()  # same port, empty
        await asyncio.sleep(0.3)
        await plugin.on_response(finish(a, 1000, 1000))  # $0.03, Redis back
        client = redis.Redis(port=own_redis.port, decode_responses=True)
        (spend,) = [k for k in client.keys("*usd*") if "/held" not in k]
        assert float(client.get(spend)) == pytest.approx(0.03)
        own_redis.kill()
        await plugin.on_request(make_ctx(max_tokens=None))  # fails: the store is marked down
        await plugin.on_response(finish(b, 2000, 2000))  # $0.06: skipped, retried later
        own_redis.start()
        client = redis.Redis(port=own_redis.port, decode_responses=True)
        deadline = time.monotonic() + 5
        while True:
            found = client.keys("*usd*")
            if found or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        (spend,) = found
        assert float(client.get(spend)) == pytest.approx(0.06)


@pytest.mark.anyio
async def test_a_request_too_large_carries_the_limit_headers(prefix: str) -> None:
    rules = [{"scope": "user", "rpm": 5, "tpm": 1000}]
    async with plugins(1, store=REDIS_URL, key_prefix=prefix, rules=rules, **PATIENT) as ps:
        first = make_ctx()
        await ps[0].on_request(first)
        reserved = first.log["limit"]["reserved_tokens"]
        big = make_ctx(max_tokens=5000)
        with pytest.raises(RateLimitError, match="Request too large") as e:
            await ps[0].on_request(big)
        assert "retry-after" not in e.value.headers
        h = big.response_headers
        assert (h["x-ratelimit-limit-requests"], h["x-ratelimit-remaining-requests"]) == (
            "5", "4")  # fmt: skip
        assert (h["x-ratelimit-limit-tokens"], h["x-ratelimit-remaining-tokens"]) == (
            "1000", str(1000 - reserved))  # fmt: skip
        # It counted for nothing.
        ctx = make_ctx()
        await ps[0].on_request(ctx)
        assert ctx.response_headers["x-ratelimit-remaining-requests"] == "3"


@pytest.mark.anyio
async def test_a_request_too_large_with_the_store_down_carries_the_limits(
    own_redis: OwnRedis,
) -> None:
    async with plugins(
        1, store=own_redis.url, on_store_error="fail_closed",
        rules=[{"scope": "user", "rpm": 5, "tpm": 1000}],
    ) as ps:  # fmt: skip
        own_redis.kill()
        big = make_ctx(max_tokens=5000)
        with pytest.raises(RateLimitError, match="Request too large"):
            await ps[0].on_request(big)
        h = big.response_headers
        assert (h["x-ratelimit-limit-requests"], h["x-ratelimit-limit-tokens"]) == ("5", "1000")
        assert "x-ratelimit-remaining-tokens" not in h  # unknown without the store


@pytest.mark.anyio
async def test_retry_after_is_the_longest_wait_of_the_failing_limits(prefix: str) -> None:
    clock = Clock()
    rules = [{"scope": "tenant", "rpm": 2}, {"scope": "user", "rpm": 1}]
    async with plugins(1, clock, store=REDIS_URL, key_prefix=prefix, rules=rules) as ps:
        await ps[0].on_request(make_ctx("bob"))
        clock.advance(10)
        await ps[0].on_request(make_ctx("alice"))
        clock.advance(1)
        with pytest.raises(RateLimitError, match="scope user") as e:  # not tenant's 49 s
            await ps[0].on_request(make_ctx("alice"))
        assert e.value.headers["retry-after"] == "59"


@pytest.mark.anyio
async def test_a_spent_budget_outweighs_a_request_limit(prefix: str) -> None:
    clock = Clock(1_767_225_600.0 + 23 * 3600)  # 23:00 UTC
    rules = [{"scope": "user", "rpm": 1}, {"scope": "tenant", "budget_usd": {"day": 0.01}}]
    async with plugins(1, clock, store=REDIS_URL, key_prefix=prefix, rules=rules) as ps:
        ctx = make_ctx()
        await ps[0].on_request(ctx)
        await ps[0].on_response(finish(ctx, 1000, 0))  # $0.01: spent
        clock.advance(1)
        with pytest.raises(QuotaExceededError) as e:  # not the 59 s of the request limit
            await ps[0].on_request(make_ctx())
        assert e.value.headers["retry-after"] == "3599"
