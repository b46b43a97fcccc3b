"""The provider interface's shared pieces: the upstream timeout and the error mapping."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest

from gateway.errors import UpstreamError, UpstreamTimeoutError
from gateway.providers.base import TimeoutQueue, upstream_errors, upstream_timeout


async def _outside_cancellation_stays_a_cancellation(guard: Callable[[], Any]) -> None:
    """A block under ``guard()`` whose task is cancelled by someone else sees CancelledError."""

    async def cancelled_from_outside() -> None:
        with guard():
            await asyncio.sleep(5)

    task = asyncio.create_task(cancelled_from_outside())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):  # not a TimeoutError
        await task


@pytest.mark.anyio
async def test_upstream_timeout_turns_its_own_cancellation_into_timeout_error() -> None:
    loop = asyncio.get_running_loop()
    start = loop.time()
    with pytest.raises(TimeoutError):
        with upstream_timeout(0.05):
            await asyncio.sleep(5)
    assert loop.time() - start < 1
    # The task carries no leftover cancellation: it can go on awaiting.
    await asyncio.sleep(0)
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0


@pytest.mark.anyio
async def test_upstream_timeout_leaves_fast_blocks_and_outside_cancellations_alone() -> None:
    with upstream_timeout(0.02):
        await asyncio.sleep(0)
    await asyncio.sleep(0.05)  # the timer was cancelled on exit: no cancellation lands here

    await _outside_cancellation_stays_a_cancellation(lambda: upstream_timeout(5))


@pytest.mark.anyio
async def test_upstream_timeout_inside_upstream_errors_is_a_504() -> None:
    with pytest.raises(UpstreamTimeoutError) as e:
        with upstream_errors("openai"), upstream_timeout(0.01):
            await asyncio.sleep(5)
    assert e.value.status == 504 and e.value.retryable


@pytest.mark.anyio
async def test_timeout_queue_times_out_each_block_at_its_own_deadline() -> None:
    """One timer for many blocks: a block that finished leaves the timer to the next one, which
    still times out at its own deadline (not the earlier block's, and not never)."""
    loop = asyncio.get_running_loop()
    queue = TimeoutQueue(0.2)
    with queue.start():
        await asyncio.sleep(0)
    await asyncio.sleep(0.1)
    start = loop.time()
    with pytest.raises(TimeoutError):
        with queue.start():
            await asyncio.sleep(5)
    assert 0.19 <= loop.time() - start < 1
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0  # no leftover cancellation
    await asyncio.sleep(0.25)  # the first block's deadline passed long ago: nothing lands here


@pytest.mark.anyio
async def test_timeout_queue_serves_concurrent_blocks_and_leaves_outside_cancellations() -> None:
    queue = TimeoutQueue(0.15)
    outcomes: dict[str, str] = {}

    async def block(name: str, work: float, pause: float = 0.0) -> None:
        await asyncio.sleep(pause)
        try:
            with queue.start():
                await asyncio.sleep(work)
            outcomes[name] = "done"
        except TimeoutError:
            outcomes[name] = "timeout"

    await asyncio.gather(block("fast", 0.01), block("slow", 5), block("later", 0.1, pause=0.1),
                         block("late-slow", 5, pause=0.05))  # fmt: skip
    assert outcomes == {"fast": "done", "slow": "timeout", "later": "done",
                        "late-slow": "timeout"}  # fmt: skip

    await _outside_cancellation_stays_a_cancellation(queue.start)
    with pytest.raises(UpstreamTimeoutError):
        with upstream_errors("openai"), queue.start():
            await asyncio.sleep(5)


@pytest.mark.anyio
async def test_upstream_errors_maps_transport_failures_and_passes_the_rest() -> None:
    with pytest.raises(UpstreamError) as e:
        with upstream_errors("openai"):
            raise aiohttp.ClientPayloadError("cut")
    assert e.value.status == 502 and "connection failed" in e.value.message
    with pytest.raises(ValueError):
        with upstream_errors("openai"):
            raise ValueError("a bug, not the upstream")


def test_retry_after_in_seconds_decimals_dates_and_milliseconds() -> None:
    from datetime import UTC, datetime, timedelta
    from email.utils import format_datetime

    from gateway.providers.errors import error_for_status, retry_after

    assert retry_after({"retry-after": "7"}) == "7"
    assert retry_after({"retry-after": "1.5"}) == "2"  # rounded up: never earlier than asked
    assert retry_after({"retry-after": "0.2"}) == "1"
    soon = datetime.now(UTC) + timedelta(seconds=30)
    assert 29 <= int(retry_after({"retry-after": format_datetime(soon, usegmt=True)}) or 0) <= 31
    assert retry_after({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) == "0"  # past: now
    assert retry_after({"retry-after-ms": "1500"}) == "2"
    assert retry_after({"retry-after": "-3"}) is None
    assert retry_after({"retry-after": "soon"}) is None
    assert retry_after({}) is None
    err = error_for_status(503, {"retry-after": "2.5"}, "", "openai")
    assert err.headers == {"retry-after": "3"}
