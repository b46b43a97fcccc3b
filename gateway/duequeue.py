"""Things that come due a fixed time after they were made, on one event-loop timer for all.

Arming and cancelling a loop timer costs ~4.6k instructions (callgrind, uvloop), and every
request sets one or two (a first-byte timeout, the start of its disconnect watch). Items of one
fixed delay come due in the order they were added, so a queue of them and a single timer,
armed for the oldest one not done yet, behave as one timer each would: an item comes due at
its ``at`` unless it is ``done`` by then. While requests keep finishing in time, the timer
fires about once per delay.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Protocol


class Due(Protocol):
    #: The loop time it comes due at.
    at: float
    #: Finished before coming due: nothing to do (it may still wait in the queue a while).
    done: bool

    def fire(self) -> None:
        """Called once, when it comes due without being done."""


class DueQueue:
    __slots__ = ("_handle", "_loop", "_pending")

    def __init__(self) -> None:
        self._pending: deque[Due] = deque()
        self._handle: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def add(self, item: Due, loop: asyncio.AbstractEventLoop) -> None:
        """Queue ``item`` (its ``at`` no earlier than any queued item's)."""
        if loop is not self._loop:  # first use, or a new event loop (tests): start afresh
            self._loop, self._handle = loop, None
            self._pending.clear()
        pending = self._pending
        while pending and pending[0].done:
            pending.popleft()
        pending.append(item)
        if self._handle is None:
            self._handle = loop.call_at(item.at, self._fire)

    def _fire(self) -> None:
        self._handle = None
        loop = self._loop
        assert loop is not None
        now = loop.time()
        pending = self._pending
        while pending:
            head = pending[0]
            if not head.done:
                if head.at > now:
                    self._handle = loop.call_at(head.at, self._fire)
                    return
                head.fire()
            pending.popleft()
