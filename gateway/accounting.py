"""Accounting at the end of every request: Prometheus metrics and the request log line (which
the ledger and tracing observe). Never raises: a bug here must not fail a request."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from gateway import metrics

if TYPE_CHECKING:
    from gateway.context import RequestContext
    from gateway.state import Gateway

log = logging.getLogger("gateway.proxy")


def _guard_blocked(verdict: Any) -> bool:
    """Whether the guard's log entry (``ctx.log["guard"]``) says it refused the request or cut
    the answer (shadow mode only reports)."""
    if not isinstance(verdict, dict) or verdict.get("mode") == "shadow":
        return False
    return any(isinstance(v, dict) and v.get("action") == "block" for v in verdict.values())


def account(gw: Gateway, ctx: RequestContext) -> None:
    """Metrics and the request log line; never raises."""
    try:
        finished = ctx.finished or time.perf_counter()
        total = finished - ctx.started
        model = ctx.model if ctx.model_entry is not None else "unknown"
        provider = ctx.deployment.provider if ctx.deployment and ctx.attempts else "none"
        metrics.REQUESTS.labels(ctx.endpoint, model, provider, str(ctx.status)).inc()
        metrics.LATENCY.labels(ctx.endpoint, model).observe(total)
        upstream = 0.0
        if ctx.upstream_started is not None:
            upstream = finished - ctx.upstream_started
            metrics.UPSTREAM_LATENCY.labels(model, provider).observe(upstream)
        metrics.OVERHEAD.labels(ctx.endpoint).observe(max(0.0, total - upstream))
        if ctx.client_disconnected:
            metrics.DISCONNECTS.inc()
        usage = ctx.usage
        if usage is not None and ctx.model_entry is not None:
            metrics.TOKENS.labels(model, "prompt").inc(usage.prompt_tokens)
            metrics.TOKENS.labels(model, "completion").inc(usage.completion_tokens)
        used = ctx.deployment if ctx.deployment and ctx.attempts else None
        record: dict[str, Any] = {
            "ts": round(time.time(), 3),
            "request_id": ctx.request_id,
            "endpoint": ctx.endpoint,
            "status": ctx.status,
            "model": ctx.model[:100] if ctx.model else None,  # as requested (maybe an alias)
            "model_name": ctx.model_entry.name if ctx.model_entry is not None else None,
            "model_used": used.model if used else None,  # what the upstream was asked for
            "provider": used.provider if used else None,
            "deployment": used.id if used else None,
            "attempts": ctx.attempts,
            "stream": ctx.stream,
            "ms_total": round(total * 1000, 3),
            "ms_upstream": round(upstream * 1000, 3),
            "ms_overhead": round(max(0.0, total - upstream) * 1000, 3),
        }
        if ctx.stream and ctx.upstream_first_byte is not None:
            record["ms_ttft"] = round((ctx.upstream_first_byte - ctx.started) * 1000, 3)
        if ctx.identity is not None:
            record["user"] = ctx.identity.user
            record["tenant"] = ctx.identity.tenant
            record["key_id"] = ctx.identity.credential_id
        if ctx.error_type:
            record["error_type"] = ctx.error_type
        if usage is not None:
            record["prompt_tokens"] = usage.prompt_tokens
            record["completion_tokens"] = usage.completion_tokens
            if usage.estimated:
                record["tokens_estimated"] = True
            if ctx.deployment is not None:
                record["cost_usd"] = round(
                    ctx.deployment.price.cost(usage.prompt_tokens, usage.completion_tokens), 8
                )
        if ctx.client_disconnected:
            record["client_disconnected"] = True
        if len(ctx.attempt_log) > 1 or (ctx.attempt_log and ctx.attempt_log[0]["error"]):
            record["attempt_log"] = ctx.attempt_log
        if ctx.log:
            record.update(ctx.log)
        if _guard_blocked(ctx.log.get("guard")):
            record["blocked"] = True
        if ctx.status == 429 and not ctx.attempts:  # refused before any upstream call
            record["limited"] = True
            record.setdefault("limit", "rejected")
        if gw.settings.logging.include_text:
            from gateway.logtext import text_fields

            record.update(text_fields(gw.settings.logging, ctx))
        gw.request_log.write(record)
        for observe in gw.observers:
            observe(ctx, record)
    except Exception:
        log.exception("accounting failed", extra={"request_id": ctx.request_id})
