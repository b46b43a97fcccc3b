"""One circuit breaker per deployment.

closed ──N consecutive failures──▶ open ──cool-down──▶ half-open ──probe ok──▶ closed
                                    ▲                      │
                                    └────probe fails───────┘

A ``Retry-After`` from the upstream opens the breaker for that long (capped), so a rate-limited
deployment is left alone as asked. While half-open exactly one request (the probe) may use the
deployment; the others skip it until the probe's outcome is known.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import Gauge

CLOSED, OPEN, HALF_OPEN = 0, 1, 2
STATE_NAMES = {CLOSED: "closed", OPEN: "open", HALF_OPEN: "half_open"}

CIRCUIT_STATE = Gauge(
    "gateway_circuit_state",
    "Circuit breaker state per deployment: 0 closed, 1 open, 2 half-open.",
    ["deployment"],
    multiprocess_mode="max",
)


@dataclass(slots=True)
class _Circuit:
    failures: int = 0
    state: int = CLOSED
    #: Clock value when an open breaker turns half-open.
    reopen_at: float = 0.0
    probing: bool = False
    #: Turns the gauge half-open when the cool-down ends (see ``Breakers._wake``).
    timer: asyncio.TimerHandle | None = None


class Breakers:
    def __init__(
        self, failures: int, cooldown_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.threshold = failures
        self.cooldown_s = cooldown_s
        self.clock = clock
        self.circuits: dict[str, _Circuit] = {}

    def add(self, dep_id: str) -> None:
        self.circuits.setdefault(dep_id, _Circuit())
        CIRCUIT_STATE.labels(dep_id).set(CLOSED)

    def _get(self, dep_id: str) -> _Circuit:
        c = self.circuits.get(dep_id)
        if c is None:
            self.add(dep_id)
            c = self.circuits[dep_id]
        return c

    def _set(self, dep_id: str, c: _Circuit, state: int) -> None:
        c.state = state
        CIRCUIT_STATE.labels(dep_id).set(state)

    def state(self, dep_id: str) -> int:
        c = self._get(dep_id)
        if c.state == OPEN and self.clock() >= c.reopen_at:
            self._set(dep_id, c, HALF_OPEN)
            c.probing = False
        return c.state

    def available(self, dep_id: str) -> bool:
        """Whether routing may use the deployment now (without claiming the probe)."""
        s = self.state(dep_id)
        return s == CLOSED or (s == HALF_OPEN and not self._get(dep_id).probing)

    def claim(self, dep_id: str) -> bool:
        """Take a half-open deployment's one probe. Returns True when the caller now holds it
        (and must settle it with ``success``, ``failure`` or ``release``); False when the
        deployment is not half-open or another request holds the probe."""
        c = self._get(dep_id)
        if self.state(dep_id) == HALF_OPEN and not c.probing:
            c.probing = True
            return True
        return False

    def release(self, dep_id: str) -> None:
        """A claimed probe that was never attempted (an earlier candidate answered)."""
        self._get(dep_id).probing = False

    def retry_in(self, dep_id: str) -> float:
        c = self._get(dep_id)
        return max(0.0, c.reopen_at - self.clock()) if c.state == OPEN else 0.0

    def success(self, dep_id: str) -> None:
        c = self._get(dep_id)
        c.failures = 0
        c.probing = False
        if c.state != CLOSED:
            self._set(dep_id, c, CLOSED)

    def failure(self, dep_id: str, retry_after: float = 0.0) -> None:
        c = self._get(dep_id)
        c.failures += 1
        was_probe = c.state == HALF_OPEN
        c.probing = False
        if was_probe or c.failures >= self.threshold:
            self._open(dep_id, c, self.cooldown_s)
        if retry_after > 0:
            self._open(dep_id, c, max(retry_after, self.retry_in(dep_id)))

    def _open(self, dep_id: str, c: _Circuit, seconds: float) -> None:
        c.reopen_at = self.clock() + seconds
        self._set(dep_id, c, OPEN)
        self._wake(dep_id, c, seconds)

    def _wake(self, dep_id: str, c: _Circuit, seconds: float) -> None:
        """Look at the breaker again when its cool-down ends: the state (and the gauge) only
        changes when looked at, and a scrape must not read "open" until some request or
        ``/readyz`` asks. A timer, not a scrape-time collector: with worker processes each
        one's gauge file must be current, whichever worker answers the scrape."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # (no loop: a unit test driving the breakers by hand)
            return
        if c.timer is not None:
            c.timer.cancel()
        # (a timer may fire a hair before the clock reaches reopen_at: a little later, then)
        c.timer = loop.call_later(seconds + 0.001, self._due, dep_id)

    def _due(self, dep_id: str) -> None:
        c = self.circuits[dep_id]
        c.timer = None
        if self.state(dep_id) == OPEN:  # (not due by this breaker's clock yet)
            self._wake(dep_id, c, max(self.retry_in(dep_id), 0.001))

    def health(self) -> dict[str, dict[str, object]]:
        out: dict[str, dict[str, object]] = {}
        for dep_id in self.circuits:
            state = self.state(dep_id)
            entry: dict[str, object] = {
                "state": STATE_NAMES[state],
                "consecutive_failures": self.circuits[dep_id].failures,
            }
            if state == OPEN:
                entry["retry_in_s"] = round(self.retry_in(dep_id), 3)
            out[dep_id] = entry
        return out
