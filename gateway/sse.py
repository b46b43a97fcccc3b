"""Server-sent events as the relay reads them: finding an event's data, the usage event and an
upstream's error event in a block of whole events with byte searches, and writing chunks back
as events."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson

from gateway import metrics
from gateway.envelope import TextChunk

if TYPE_CHECKING:
    from gateway.context import RequestContext

DONE = b"data: [DONE]\n\n"
#: Searched with ``bytes.find``: ``x in some_bytes`` first tries ``x`` as an integer and
#: formats (then discards) a TypeError, several times the cost of the search itself.
USAGE_KEY = b'"usage":'


def usage_at(data: bytes, start: int = 0) -> int:
    """Where the first ``"usage":{`` or ``"usage": {`` at or after ``start`` is, or -1 (one
    pass over the bytes: ``"usage":null`` chunks are skipped here)."""
    at = data.find(USAGE_KEY, start)
    while at != -1:
        after = at + len(USAGE_KEY)
        if data[after : after + 1] == b"{" or data[after : after + 2] == b" {":
            return at
        at = data.find(USAGE_KEY, after)
    return -1


ERROR_KEY = b'"error"'


def error_event(complete: bytes) -> tuple[int, int, dict[str, Any]] | None:
    """The first event of ``complete`` whose payload is an error object (``{"error": ...}``,
    as vLLM ends a failed stream): its start, its end and the object; None if there is none.
    (``"error"`` with both quotes bare cannot be inside a JSON string, where quotes are
    escaped: one search rules out almost every block.)"""
    at = complete.find(ERROR_KEY)
    while at != -1:
        start = complete.rfind(b"\n\n", 0, at)
        start = 0 if start == -1 else start + 2
        end = complete.find(b"\n\n", at)  # (``complete`` ends with an event's "\n\n")
        end = len(complete) if end == -1 else end + 2
        payload = event_data(complete[start : end - 2])
        try:
            obj = orjson.loads(payload) if payload else None
        except orjson.JSONDecodeError:
            obj = None
        if type(obj) is dict and "error" in obj:
            return start, end, obj
        at = complete.find(ERROR_KEY, end)
    return None


def event_data(event: bytes) -> bytes | None:
    """The data of one SSE event (several ``data:`` lines are joined per the SSE spec)."""
    if event.startswith(b"data:") and event.find(b"\n") == -1:  # the usual one-line event
        return event[5:].lstrip(b" ")
    data = [line[5:].lstrip(b" ") for line in event.split(b"\n") if line.startswith(b"data:")]
    if not data:
        return None
    return b"\n".join(data)


def as_events(chunks: list[Any]) -> bytes:
    """Chunks (dicts, or text in an envelope) as SSE events."""
    if not chunks:
        return b""
    payloads = [c.payload() if type(c) is TextChunk else orjson.dumps(c) for c in chunks]
    return b"data: " + b"\n\ndata: ".join(payloads) + b"\n\n"


SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


def upstream_failed(ctx: RequestContext, error_type: str) -> None:
    """The deployment failed after it began answering (the stream cut, stalled, or ended by an
    error event): counted like a failed attempt, in the metrics and (the route plugin reads
    ``ctx.upstream_failed``) by its circuit breaker."""
    ctx.upstream_failed = True
    if ctx.deployment is not None:
        metrics.UPSTREAM_ERRORS.labels(ctx.deployment.id, error_type).inc()
