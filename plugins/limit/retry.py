"""Settlements the limit store did not take (Redis down or slow), retried in the background
until the store answers or the slot they hold would have expired anyway."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from typing import TYPE_CHECKING, Literal

from prometheus_client import Counter

from .store_base import Reservation
from .store_redis import RedisStore, StoreUnavailable

if TYPE_CHECKING:
    from .plugin import LimitPlugin

SETTLE_RETRIES = Counter(
    "gateway_limit_settlement_retries_total",
    "Settlements that failed on the store and were retried in the background, by outcome: "
    "applied (the whole settlement), released (the concurrency slot and budget holds only, "
    "also of an admission that timed out), dropped.",
    ["outcome"],
)

#: Settlements waiting for the store to come back; past this the oldest is dropped.
_MAX_PENDING = 10_000

#: How a pending settlement is retried: ``settle`` whole (it never reached Redis), ``release``
#: the slot and holds only (it may have been applied), ``abandon`` an admission that timed out
#: (release, and mark the slot so that Redis, if it has not run the admission yet, never will).
Mode = Literal["settle", "release", "abandon"]


class SettlementQueue:
    """The limit plugin's pending settlements: one background task retries them, oldest
    first, while there are any."""

    def __init__(self, plugin: LimitPlugin) -> None:
        self.plugin = plugin
        #: (reservation, time, used tokens, cost, how to retry it, give-up time)
        self._pending: deque[tuple[Reservation, float, int, float, Mode, float]] = deque()
        self._retry_task: asyncio.Task[None] | None = None

    async def close(self) -> None:
        """Stop retrying; one last try, so that a restart loses as little as it can."""
        task, self._retry_task = self._retry_task, None
        if task is not None:
            task.cancel()  # and wait for it: two loops over the queue would both pop its head
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._pending:
            try:
                async with asyncio.timeout(2.0):
                    await self._retry_pending()
            except TimeoutError:
                pass

    def defer(self, res: Reservation, now: float, used: int, cost: float, mode: Mode) -> None:
        """Retry a settlement the store did not take, in the background, until the slot would
        have expired anyway. A settlement that never reached Redis is retried whole; one that
        may have been applied (a timeout) only frees its concurrency slot, which is safe to
        repeat, so its tokens and cost are never counted twice. Without this, a Redis blip held
        each slot it caught for ``parallel_slot_ttl_s`` (15 minutes by default). An admission
        that timed out (``abandon``) is released the same way."""
        if mode == "release" and not res.parallel_keys and not res.budget_keys:
            return  # nothing that is safe to repeat
        if len(self._pending) >= _MAX_PENDING:
            self._pending.popleft()
            SETTLE_RETRIES.labels("dropped").inc()
        self._pending.append((res, now, used, cost, mode, time.monotonic() + self.plugin._slot_ttl))
        if self._retry_task is None or self._retry_task.done():
            self._retry_task = asyncio.get_running_loop().create_task(self._retry_loop())

    async def _retry_loop(self) -> None:
        pause = max(self.plugin.config.retry_store_after_s, 0.1)
        while self._pending:
            await asyncio.sleep(pause)
            await self._retry_pending()

    async def _retry_pending(self) -> None:
        """Retry the pending settlements, oldest first, until the store fails again."""
        store = self.plugin.store
        if not isinstance(store, RedisStore):
            self._pending.clear()
            return
        while self._pending:
            res, now, used, cost, mode, give_up = self._pending[0]
            if time.monotonic() > give_up:  # its slot has expired meanwhile
                self._pending.popleft()
                SETTLE_RETRIES.labels("dropped").inc()
                continue
            try:
                if mode == "settle":
                    await store.settle(res, now=now, used_tokens=used, cost_usd=cost)
                elif mode == "release":
                    await store.release(res)
                else:
                    await store.release(res, abandon_ttl=self.plugin._slot_ttl)
            except StoreUnavailable as e:
                if mode == "settle" and e.sent:  # this try may have been applied: only free
                    self._pending[0] = (res, now, used, cost, "release", give_up)  # the slot
                    if not res.parallel_keys and not res.budget_keys:
                        self._pending.popleft()
                return
            self._pending.popleft()
            SETTLE_RETRIES.labels("applied" if mode == "settle" else "released").inc()
