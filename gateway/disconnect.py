"""Noticing a client that leaves while its request waits for or relays the upstream's answer.

uvicorn tells an app its client went away only through ``receive()``, which a proxied request
does not otherwise call once it has read the body: a task has to wait on it. Starting that task
for every request would cost more than most requests take, so it starts only for a request
still running ``WATCH_AFTER_S`` after its watch was made, all of a gateway's watches on one
loop timer (``WatchQueue``).
"""

from __future__ import annotations

import asyncio
from typing import Any

from gateway.duequeue import DueQueue

#: A request still waiting for or relaying its upstream answer this long after it started gets
#: a task that watches for the client going away. A fast upstream's answer is usually over by
#: then, so most requests never pay for the task; a disconnect is still noticed at most this
#: much later.
WATCH_AFTER_S = 0.1


class WatchQueue(DueQueue):
    """The delayed starts of every :class:`DisconnectWatch` of one gateway, on one loop timer
    (all wait the same ``WATCH_AFTER_S``)."""

    __slots__ = ()


class DisconnectWatch:
    """Cancels the request's task when the client disconnects, from ``WATCH_AFTER_S`` after it
    was made until ``stop()``: while the attempts run and while a stream is relayed."""

    __slots__ = ("at", "disconnected", "done", "main", "receive", "task")

    def __init__(self, receive: Any, queue: WatchQueue) -> None:
        loop = asyncio.get_running_loop()
        main = asyncio.current_task(loop)
        assert main is not None
        self.main = main
        self.receive = receive
        self.done = False
        self.disconnected = False
        self.task: asyncio.Task[None] | None = None
        self.at = loop.time() + WATCH_AFTER_S
        queue.add(self, loop)

    def fire(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self.watch())

    async def watch(self) -> None:
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                if not self.done:
                    self.disconnected = True
                    self.main.cancel()
                return

    def stop(self) -> None:
        self.done = True
        if self.task is not None:
            self.task.cancel()
            self.task = None
