"""Load balancing across the deployments of one model.

* ``weighted``: a weighted random order (the first pick is proportional to ``weight``; the rest
  follow as failover, again by weight). Stateless, so it holds across workers.
* ``least_busy``: fewest requests in flight per unit of weight (ties broken by weighted random).
  Adapts to a slow deployment at once, because its requests pile up.
* ``latency``: in-flight x moving average of time to first byte, per unit of weight; a deployment
  with no sample yet scores 0, so each one gets tried.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.catalogue import Deployment


def weighted_order(deps: Sequence[Deployment], rng: random.Random) -> list[Deployment]:
    """Weighted sampling without replacement (Efraimidis-Spirakis keys)."""
    return sorted(deps, key=lambda d: -(rng.random() ** (1.0 / d.weight)))


class Balancer:
    def __init__(self, strategy: str, alpha: float = 0.3, seed: int | None = None) -> None:
        self.strategy = strategy
        self.alpha = alpha
        self.rng = random.Random(seed)
        self.busy: dict[str, int] = {}
        self.latency: dict[str, float] = {}

    def order(self, deps: Sequence[Deployment]) -> list[Deployment]:
        shuffled = weighted_order(deps, self.rng)
        if self.strategy == "weighted" or len(deps) < 2:
            return shuffled
        if self.strategy == "least_busy":
            return sorted(shuffled, key=lambda d: (self.busy.get(d.id, 0) + 1) / d.weight)
        return sorted(
            shuffled,
            key=lambda d: self.latency.get(d.id, 0.0) * (self.busy.get(d.id, 0) + 1) / d.weight,
        )  # stable sort: equal scores keep the weighted order

    def start(self, dep_id: str) -> None:
        self.busy[dep_id] = self.busy.get(dep_id, 0) + 1

    def end(self, dep_id: str) -> None:
        n = self.busy.get(dep_id, 0) - 1
        self.busy[dep_id] = max(0, n)

    def observe(self, dep_id: str, seconds: float) -> None:
        old = self.latency.get(dep_id)
        self.latency[dep_id] = seconds if old is None else old + self.alpha * (seconds - old)
