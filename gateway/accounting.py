"""Accounting at the end of every request: Prometheus metrics and the request log line (which
the ledger and tracing observe). Never raises: a bug here must not fail a request."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from gateway import metrics
from gateway.catalogue import FREE

if TYPE_CHECKING:
    from gateway.catalogue import Deployment, ModelEntry
    from gateway.context import RequestContext
    from gateway.state import Gateway

log = logging.getLogger("gateway.proxy")

#: Powers of ten, all exact as floats.
_SCALE = (1.0, 10.0, 100.0, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8)
#: 1.5 * 2**52: adding and subtracting it rounds a float in [0, 2**51) to the nearest integer
#: (ties to even), in float arithmetic alone.
_ROUNDER = 6755399441055744.0


def fast_round(x: float, digits: int) -> float:
    """``round(x, digits)`` for a float ``x`` and ``0 <= digits <= 8``: the same float, bit for
    bit (checked on ~6M values, ties and their neighbours included), for about half the cost
    (callgrind: ~1.5k instructions instead of ~3k; a request rounds six times), because
    ``round`` goes through a decimal string (dtoa, then strtod).

    Away from a tie, the integer nearest ``y = x * 10**digits`` is the one nearest the exact
    product (below 4e12 the product's float error is under 2.5e-4, far inside the 0.001 margin),
    and dividing it by the exact power of ten rounds once, to the same float as strtod of the
    decimal. Near a tie, zero, negative, huge or NaN: ``round`` itself.
    """
    scale = _SCALE[digits]
    y = x * scale
    if 0.0 < y < 4e12:
        r = (y + _ROUNDER) - _ROUNDER
        if -0.499 < y - r < 0.499:
            return r / scale
    return round(x, digits)


def _guard_blocked(verdict: Any) -> bool:
    """Whether the guard's log entry (``ctx.log["guard"]``) says it refused the request or cut
    the answer (shadow mode only reports)."""
    if not isinstance(verdict, dict) or verdict.get("mode") == "shadow":
        return False
    for v in verdict.values():  # (a loop: any() over a generator costs ~2k more per request)
        if isinstance(v, dict) and v.get("action") == "block":
            return True
    return False


class _Series:
    """What one (endpoint, model entry, deployment used, status) gives every request's
    accounting, looked up once: the metric series and the plain values of the entry and the
    deployment (they are pydantic models: each attribute read costs ~450 instructions, a slot
    here ~40)."""

    __slots__ = (
        "deployment", "entry", "metrics", "model_name", "model_used", "provider", "rates", "used",
    )  # fmt: skip

    def __init__(
        self, endpoint: str, entry: ModelEntry | None, used: Deployment | None, status: int
    ) -> None:
        # Held, so that their ids (in the key) cannot be reused while this entry exists.
        self.entry = entry
        self.used = used
        provider = used.provider if used is not None else "none"
        self.model_name = entry.name if entry is not None else None
        # The catalogue's name, as the cost counter and the ledger have it (an alias is the
        # same model; the request log keeps the name asked for).
        model = self.model_name or "unknown"
        self.metrics = metrics.RequestSeries(endpoint, model, provider, status)
        self.model_used = used.model if used is not None else None
        self.provider = provider if used is not None else None
        self.deployment = used.id if used is not None else None
        self.rates = used.price.rates if used is not None else FREE


#: By (endpoint, id of the entry, id of the deployment used, status). The labels come from
#: configuration and a few status codes, so this stays small; entries and deployments
#: are the catalogue's, fixed for a gateway's life (more appear only when several gateways are
#: built in one process, as tests do: hence the bound).
_SERIES: dict[tuple[str, int, int, int], _Series] = {}
_MAX_SERIES = 4096


def _series(ctx: RequestContext, used: Deployment | None) -> _Series:
    key = (ctx.endpoint, id(ctx.model_entry), id(used), ctx.status)
    series = _SERIES.get(key)
    if series is None:
        if len(_SERIES) >= _MAX_SERIES:
            _SERIES.clear()
        series = _SERIES[key] = _Series(ctx.endpoint, ctx.model_entry, used, ctx.status)
    return series


def account(gw: Gateway, ctx: RequestContext) -> None:
    """Metrics and the request log line; never raises."""
    try:
        finished = ctx.finished or time.perf_counter()
        total = finished - ctx.started
        entry = ctx.model_entry
        used = ctx.deployment if ctx.attempts and ctx.deployment is not None else None
        series = _series(ctx, used)
        upstream = 0.0
        observed: float | None = None  # the upstream latency, when there was an upstream call
        if ctx.upstream_started is not None:
            upstream = observed = finished - ctx.upstream_started
        overhead = total - upstream if total > upstream else 0.0
        usage = ctx.usage
        if usage is not None and entry is not None:
            series.metrics.record(
                total, observed, overhead, usage.prompt_tokens, usage.completion_tokens
            )
        else:
            series.metrics.record(total, observed, overhead, None, 0)
        if ctx.client_disconnected:
            metrics.DISCONNECTS.inc()
        if ctx.error_type and ctx.stream and ctx.status == 200:
            metrics.FAILED_STREAMS.labels(ctx.endpoint, series.model_name or "unknown").inc()
        record: dict[str, Any] = {
            "ts": fast_round(time.time(), 3),
            "request_id": ctx.request_id,
            "endpoint": ctx.endpoint,
            "status": ctx.status,
            "model": ctx.model[:100] if ctx.model else None,  # as requested (maybe an alias)
            "model_name": series.model_name,
            "model_used": series.model_used,  # what the upstream was asked for
            "provider": series.provider,
            "deployment": series.deployment,
            "attempts": ctx.attempts,
            "stream": ctx.stream,
            "ms_total": fast_round(total * 1000, 3),
            "ms_upstream": fast_round(upstream * 1000, 3),
            "ms_overhead": fast_round(overhead * 1000, 3),
        }
        if ctx.stream and ctx.upstream_first_byte is not None:
            record["ms_ttft"] = fast_round((ctx.upstream_first_byte - ctx.started) * 1000, 3)
        identity = ctx.identity
        if identity is not None:
            record["user"] = identity.user
            record["tenant"] = identity.tenant
            record["key_id"] = identity.credential_id
        if ctx.error_type:
            record["error_type"] = ctx.error_type
        if usage is not None:
            record["prompt_tokens"] = usage.prompt_tokens
            record["completion_tokens"] = usage.completion_tokens
            cached, write = usage.cached_tokens, usage.cache_write_tokens
            if cached or write:
                record["cached_tokens"] = cached
                record["cache_write_tokens"] = write
                if usage.cache_write_1h_tokens:
                    record["cache_write_1h_tokens"] = usage.cache_write_1h_tokens
            if usage.estimated:
                record["tokens_estimated"] = True
            if used is not None:  # (the prices read once per series)
                record["cost_usd"] = fast_round(series.rates.cost_of(usage), 8)
            elif ctx.deployment is not None:  # answered without an upstream call (a cache hit)
                record["cost_usd"] = fast_round(ctx.deployment.price.cost_of(usage), 8)
        if ctx.client_disconnected:
            record["client_disconnected"] = True
        attempt_log = ctx.attempt_log
        if attempt_log and (len(attempt_log) > 1 or attempt_log[0]["error"]):
            record["attempt_log"] = attempt_log
        plugin_fields = ctx.log
        if plugin_fields:
            record.update(plugin_fields)
            guard = plugin_fields.get("guard")
            if guard is not None and _guard_blocked(guard):
                record["blocked"] = True
        if ctx.status == 429 and not ctx.attempts:  # refused before any upstream call
            record["limited"] = True
            record.setdefault("limit", "rejected")
        if gw.include_text:
            from gateway.logtext import text_fields

            record.update(text_fields(gw.settings.logging, ctx))
        gw.request_log.write(record)
        for observe in gw.observers:
            observe(ctx, record)
    except Exception:
        log.exception("accounting failed", extra={"request_id": ctx.request_id})
