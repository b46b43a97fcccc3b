"""The retry budget: a token bucket so a failing provider cannot multiply traffic.

Every request deposits ``ratio`` tokens and time deposits ``floor_per_s``; a retry (any attempt
after the first) withdraws one. Over any stretch, retries ≤ ratio x requests + floor x seconds
+ burst, whatever the failure rate (Finagle's RetryBudget, simplified).
"""

from __future__ import annotations

import time
from collections.abc import Callable


class RetryBudget:
    def __init__(
        self,
        ratio: float,
        floor_per_s: float,
        burst: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ratio = ratio
        self.floor_per_s = floor_per_s
        self.burst = burst
        self.clock = clock
        self.tokens = burst
        self.last = clock()
        self.exhausted = 0

    def _refill(self) -> None:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.floor_per_s)
        self.last = now

    def deposit(self) -> None:
        self._refill()
        self.tokens = min(self.burst, self.tokens + self.ratio)

    def withdraw(self) -> bool:
        self._refill()
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        self.exhausted += 1
        return False
