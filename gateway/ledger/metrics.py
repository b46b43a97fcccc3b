"""Cost and usage metrics, and the ledger's own health metrics.

Label values come only from configuration: a tenant or user gets its own series only when
listed in ``metrics.tenants`` / ``metrics.users``; everyone else is ``other``. Per-user series
exist only when ``metrics.users`` is set. All are plain counters (or a ``livesum`` gauge), so
they aggregate correctly in Prometheus multiprocess mode.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prometheus_client import Counter

from gateway.metrics import own_counter

if TYPE_CHECKING:
    from gateway.config import MetricsConfig
    from gateway.context import RequestContext

#: Updated on every request with a price: in one process a plain-number counter like the core's
#: (prometheus_client's ``inc`` validates and locks: ~4k instructions of a request).
COST = own_counter(
    "gateway_cost_usd",
    "Estimated spend in USD (price table x tokens), by public model and tenant.",
    ["model", "tenant"],
)
BLOCKED = Counter(
    "gateway_blocked_requests",
    "Requests refused by the guard (input or output), by endpoint.",
    ["endpoint"],
)
USER_COST = Counter(
    "gateway_user_cost_usd", "Estimated spend in USD per configured user.", ["user"]
)
USER_REQUESTS = Counter(
    "gateway_user_requests", "Requests per configured user, by status class.", ["user", "status"]
)
LEDGER_WRITTEN = Counter("gateway_ledger_rows_written", "Usage rows written to the ledger.")
LEDGER_DROPPED = Counter(
    "gateway_ledger_rows_dropped",
    "Usage rows lost: buffer full while the database was unreachable, or still unwritten when "
    "the shutdown timeout passed.",
    ["reason"],
)
LEDGER_ERRORS = Counter(
    "gateway_ledger_write_errors", "Failed ledger writes (each is retried), by error type.",
    ["error"],
)  # fmt: skip
# gateway_ledger_buffered_rows: read from the writers (gateway.metrics.track_ledger), not
# updated per row.


class UsageMetrics:
    """Observer (``gateway.observers``): counts cost, blocks and per-user series per request."""

    def __init__(self, config: MetricsConfig) -> None:
        self.tenants = frozenset(config.tenants)
        self.users = frozenset(config.users)
        #: ``COST.labels(...)`` children by (model, tenant label): prometheus_client validates
        #: and locks on every ``labels`` call. Bounded: both come from configuration.
        self._cost: dict[tuple[str, str], Any] = {}

    def __call__(self, ctx: RequestContext, record: dict[str, Any]) -> None:
        cost = record.get("cost_usd")
        if cost:
            tenant = record.get("tenant")
            label = tenant if tenant in self.tenants else "other"
            key = (record.get("model_name") or "unknown", label)
            child = self._cost.get(key)
            if child is None:
                child = self._cost[key] = COST.labels(*key)
            child.inc(cost)
        if record.get("blocked"):
            BLOCKED.labels(ctx.endpoint).inc()
        if self.users:
            user = record.get("user")
            if user is not None:
                label = user if user in self.users else "other"
                status = record.get("status") or 0
                USER_REQUESTS.labels(label, f"{status // 100}xx").inc()
                if cost:
                    USER_COST.labels(label).inc(cost)
