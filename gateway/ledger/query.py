"""Answers for the usage API and the dashboard, built from the backend's grouped sums."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

from gateway.errors import InvalidRequestError
from gateway.ledger import backend as _backend
from gateway.ledger.backend import Backend, Filter, Groups


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (``q`` in 0..100) of ``values``; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return round(ordered[rank - 1], 3)


def _rates(item: dict[str, Any]) -> dict[str, Any]:
    n = item.get("requests") or 0
    item["error_rate"] = round(item["errors"] / n, 6) if n else 0.0
    item["block_rate"] = round(item["blocked"] / n, 6) if n else 0.0
    item["cost_usd"] = round(item["cost_usd"], 8)
    return item


def usage_by_day_model(backend: Backend, flt: Filter) -> Groups:
    """``GET /v1/usage``: one entry per (day, model); ``truncated`` past ``GROUP_LIMIT`` (the
    latest days kept)."""
    groups = backend.grouped(flt, ("day", "model"))
    out = Groups(_rates(r) for r in groups)
    out.truncated = groups.truncated
    return out


def bucket_count(flt: Filter, bucket_s: int) -> int:
    """How many time buckets of ``bucket_s`` seconds the range touches."""
    return int((flt.end - 1e-6) // bucket_s - flt.start // bucket_s) + 1


def summary(
    backend: Backend, flt: Filter, bucket_s: int, top: int = 20, refuse_over_limit: bool = False
) -> dict[str, Any]:
    """``GET /admin/usage/summary``: everything the dashboard draws. ``truncated``: a part had
    more groups than ``GROUP_LIMIT`` (the series keep their latest buckets). With
    ``refuse_over_limit`` (an explicit ``bucket=hour``) a range whose buckets times models
    would pass the limit is refused instead (400)."""
    by_model = backend.grouped(flt, ("model",), order_by_cost=True)
    points = bucket_count(flt, bucket_s) * max(1, len(by_model))
    if refuse_over_limit and points > _backend.GROUP_LIMIT:
        raise InvalidRequestError(
            f"bucket=hour over this range needs {points} points (hours x models), more than the "
            f"{_backend.GROUP_LIMIT} one answer holds: use bucket=day or a shorter range",
            param="bucket",
        )
    totals = backend.grouped(flt, ())
    total = _rates(totals[0]) if totals else {}
    series_groups = backend.grouped(flt, ("bucket",), bucket_s=bucket_s)
    series = [_rates(r) for r in series_groups]
    by_model_time = backend.grouped(flt, ("bucket", "model"), bucket_s=bucket_s)
    lat = backend.latencies(flt)
    per_model: dict[str, list[float]] = defaultdict(list)
    ttft: list[float] = []
    for model, ms, first in lat:
        per_model[model].append(ms)
        if first is not None:
            ttft.append(first)
    all_ms = [ms for _, ms, _ in lat]
    return {
        "truncated": series_groups.truncated or by_model_time.truncated or by_model.truncated,
        "totals": total,
        "series": series,
        "series_by_model": [
            {
                "bucket": r["bucket"],
                "model": r["model"],
                "cost_usd": round(r["cost_usd"], 8),
                "requests": r["requests"],
                "tokens": r["prompt_tokens"] + r["completion_tokens"],
            }
            for r in by_model_time
        ],
        "by_model": [_rates(r) for r in by_model],
        "by_tenant": [
            _rates(r) for r in backend.grouped(flt, ("tenant",), order_by_cost=True, limit=top)
        ],
        "by_user": [
            _rates(r) for r in backend.grouped(flt, ("user",), order_by_cost=True, limit=top)
        ],
        "latency_ms": {
            "sample": len(all_ms),
            "p50": percentile(all_ms, 50),
            "p90": percentile(all_ms, 90),
            "p99": percentile(all_ms, 99),
            "ttft_p50": percentile(ttft, 50),
            "ttft_p90": percentile(ttft, 90),
        },
        "latency_by_model": [
            {
                "model": m,
                "p50": percentile(v, 50),
                "p90": percentile(v, 90),
                "p99": percentile(v, 99),
            }
            for m, v in sorted(per_model.items())
        ],
    }
