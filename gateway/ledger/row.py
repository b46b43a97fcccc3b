"""One ledger row per request, built from the request log record so the two always agree."""

from __future__ import annotations

import time
import uuid
from typing import Any

#: Column order of the ledger table (and of the CSV export).
COLUMNS: tuple[str, ...] = (
    "request_id", "ts", "day", "user_id", "tenant", "key_id", "endpoint", "model",
    "model_requested", "deployment", "provider", "status", "error_type", "blocked", "limited",
    "stream", "client_disconnected", "attempts", "prompt_tokens", "completion_tokens",
    "tokens_estimated", "cost_usd", "ms_total", "ms_upstream", "ms_ttft", "cached_tokens",
    "cache_write_tokens",
)  # fmt: skip

#: What the table stores: the columns above plus ``row_id``, a random id made when the row is
#: built. A batch whose commit reached the database but whose acknowledgement was lost (the
#: connection dropped) is retried; the unique ``row_id`` makes that retry insert nothing, so a
#: row is never counted twice. (``request_id`` cannot serve: clients may reuse their own.)
STORED_COLUMNS: tuple[str, ...] = (*COLUMNS, "row_id")

Row = tuple[Any, ...]


def day_of(ts: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(ts))


def row_from(record: dict[str, Any]) -> Row:
    """The ledger row of one request log record (``gateway.proxy.account`` builds it)."""
    ts = float(record.get("ts") or time.time())
    return (
        str(record.get("request_id", ""))[:128],
        ts,
        day_of(ts),
        record.get("user"),
        record.get("tenant"),
        record.get("key_id"),
        record.get("endpoint", ""),
        record.get("model_name") or "unknown",
        (record.get("model") or "")[:100],
        record.get("deployment"),
        record.get("provider"),
        int(record.get("status") or 0),
        record.get("error_type"),
        1 if record.get("blocked") else 0,
        1 if record.get("limited") else 0,
        1 if record.get("stream") else 0,
        1 if record.get("client_disconnected") else 0,
        int(record.get("attempts") or 0),
        int(record.get("prompt_tokens") or 0),
        int(record.get("completion_tokens") or 0),
        1 if record.get("tokens_estimated") else 0,
        float(record.get("cost_usd") or 0.0),
        float(record.get("ms_total") or 0.0),
        float(record.get("ms_upstream") or 0.0),
        record.get("ms_ttft"),
        int(record.get("cached_tokens") or 0),
        int(record.get("cache_write_tokens") or 0),
        uuid.uuid4().hex,
    )


def as_dict(row: Row) -> dict[str, Any]:
    return dict(zip(COLUMNS, row[: len(COLUMNS)], strict=True))
