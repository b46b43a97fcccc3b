"""The fake's shared machinery: behaviour resolution, failure injection, recording, counters.

Every fake API (OpenAI here, Anthropic in ``gateway/fake_anthropic.py``) uses these, so
recording, ``x-fake-*`` headers and ``/_fake/stats`` work the same for all of them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import orjson
from aiohttp import web


@dataclasses.dataclass(frozen=True)
class Behaviour:
    chunks: int = 20
    delay_ms: float = 0.0
    status: int = 0
    retry_after: str = ""
    hang_ms: float = 0.0
    drop_after: int = -1
    stall_after: int = -1
    no_usage: bool = False
    content: str | None = None
    error_code: str = ""
    error_param: str = ""
    annotations: str = ""
    #: A JSON object merged into the answer's ``usage`` (a null value removes the key).
    usage: str = ""
    error_event_after: int = -1
    keepalive_ms: float = 0.0

    def merged(self, overrides: Mapping[str, Any]) -> Behaviour:
        return dataclasses.replace(self, **overrides) if overrides else self


FIELDS = {f.name: f for f in dataclasses.fields(Behaviour)}
HEADERS = {"x-fake-" + name.replace("_", "-"): name for name in FIELDS}


def _coerce(name: str, value: Any) -> Any:
    """Convert a header/CLI/dict value to the field's type; ValueError names the problem."""
    kind = FIELDS[name].type
    if kind == "bool":
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on", ""):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{name}: expected a boolean, got {value!r}")
    if kind == "int":
        out = int(value)
        if name == "chunks" and out < 1:
            raise ValueError("chunks must be at least 1")
        if name == "status" and out and not 200 <= out <= 599:
            raise ValueError("status must be an HTTP status between 200 and 599")
        return out
    if kind == "float":
        out_f = float(value)
        if out_f < 0:
            raise ValueError(f"{name} must not be negative")
        return out_f
    if name == "annotations" and value:
        try:
            ok = isinstance(orjson.loads(value), list)
        except orjson.JSONDecodeError:
            ok = False
        if not ok:
            raise ValueError("annotations must be a JSON list")
    if name == "usage":
        try:
            parsed = orjson.loads(value) if value else {}
        except orjson.JSONDecodeError:
            parsed = None
        if not isinstance(parsed, dict):
            raise ValueError("usage must be a JSON object")
    return str(value)


def usage_with(usage: dict[str, Any], b: Behaviour) -> dict[str, Any]:
    """``usage`` with the behaviour's ``usage`` object merged in (a null value removes)."""
    if not b.usage:
        return usage
    out = {**usage, **orjson.loads(b.usage)}
    return {k: v for k, v in out.items() if v is not None}


def check_overrides(overrides: Mapping[str, Any], where: str) -> dict[str, Any]:
    unknown = [k for k in overrides if k not in FIELDS]
    if unknown:
        raise ValueError(f"{where}: unknown behaviour {unknown[0]!r}; allowed: {', '.join(FIELDS)}")
    return {k: _coerce(k, v) for k, v in overrides.items()}


class FakeState:
    """Server defaults, the per-model map, the request record and the stream counters."""

    def __init__(
        self, defaults: Behaviour, behaviours: Mapping[str, Mapping[str, Any]], record: int
    ) -> None:
        self.defaults = defaults
        self.behaviours = {
            m: check_overrides(b, f"behaviours[{m!r}]") for m, b in behaviours.items()
        }
        self.requests: deque[dict[str, Any]] = deque(maxlen=record)
        self.record_enabled = record > 0
        self.counter = 0
        self.stats: dict[str, Any] = {}
        self.reset_stats()

    def reset_stats(self) -> None:
        self.stats = {
            "requests_total": 0,
            "errors_injected": 0,
            "streams_started": 0,
            "streams_completed": 0,
            "streams_cancelled": 0,
            "streams_dropped": 0,
            "streams_in_flight": 0,
            "requests_cancelled": 0,
            "last_cancelled_at": None,
        }

    def next_id(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}-fake-{self.counter}"


STATE = web.AppKey("fake_state", FakeState)


class HeaderError(Exception):
    pass


def behaviour_for(request: web.Request, model: str) -> Behaviour:
    """Defaults < per-model map < ``x-fake-*`` headers. Raises HeaderError on a bad header."""
    state = request.app[STATE]
    b = state.defaults.merged(state.behaviours.get(model, {}))
    overrides: dict[str, Any] = {}
    for key, value in request.headers.items():
        name = HEADERS.get(key.lower())
        if name is None:
            continue
        try:
            overrides[name] = _coerce(name, value)
        except ValueError as e:
            raise HeaderError(f"bad {key.lower()} header: {e}") from None
    return b.merged(overrides)


_ERROR_TYPES = {
    400: ("invalid_request_error", None),
    401: ("authentication_error", "invalid_api_key"),
    403: ("permission_error", None),
    404: ("not_found_error", "model_not_found"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
}


def error_response(
    status: int, message: str, retry_after: str = "", code: str = "", param: str = ""
) -> web.Response:
    kind, default = _ERROR_TYPES.get(
        status, ("server_error" if status >= 500 else "api_error", None)
    )
    body = {"error": {"message": message, "type": kind, "param": param or None,
                      "code": code or default}}  # fmt: skip
    headers = {"Retry-After": retry_after} if retry_after else None
    return web.Response(
        status=status, body=orjson.dumps(body), content_type="application/json", headers=headers
    )


def record(request: web.Request, body: Any) -> None:
    state = request.app[STATE]
    state.stats["requests_total"] += 1
    if state.record_enabled:
        state.requests.append(
            {
                "method": request.method,
                "path": request.path,
                "query": request.query_string,
                "headers": [[k, v] for k, v in request.headers.items()],
                "body": body,
            }
        )


async def read_json(request: web.Request) -> tuple[dict[str, Any] | None, web.Response | None]:
    """Parse and record the body; an unparsable one is recorded as text and answered 400."""
    raw = await request.read()
    try:
        body = orjson.loads(raw) if raw else {}
    except orjson.JSONDecodeError:
        record(request, raw.decode("utf-8", "replace"))
        return None, error_response(400, "the body is not valid JSON")
    record(request, body)
    if not isinstance(body, dict):
        return None, error_response(400, "the body must be a JSON object")
    return body, None


async def prelude(
    request: web.Request, model: str, stream: bool = False
) -> tuple[Behaviour | None, web.Response | None]:
    """Resolve behaviour, hang, and inject an error: the part every endpoint shares. (A stream
    with ``keepalive_ms`` hangs after its headers, sending comments: see ``keepalive``.)"""
    try:
        b = behaviour_for(request, model)
    except HeaderError as e:
        return None, error_response(400, str(e))
    if b.hang_ms and not (stream and b.keepalive_ms):
        await asyncio.sleep(b.hang_ms / 1000)
    if b.status >= 300:
        request.app[STATE].stats["errors_injected"] += 1
        return None, error_response(
            b.status,
            f"injected failure {b.status} for model {model!r}",
            b.retry_after,
            b.error_code,
            b.error_param,
        )
    return b, None


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def counts_cancel(handler: Handler) -> Handler:
    """Count requests the client abandoned (any phase: hang, body, stream)."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except asyncio.CancelledError:
            stats = request.app[STATE].stats
            stats["requests_cancelled"] += 1
            stats["last_cancelled_at"] = time.time()
            raise

    return wrapped


def cut(request: web.Request) -> None:
    """Close the socket so the client sees a truncated body, not a clean end."""
    if request.transport is not None:
        request.transport.close()


async def stall() -> None:
    """``x-fake-stall-after`` reached: send nothing more, keeping the connection open, until the
    client goes away (the stream's task is then cancelled)."""
    await asyncio.Event().wait()


async def keepalive(resp: web.StreamResponse, b: Behaviour) -> None:
    """``x-fake-keepalive-ms``: the headers went out; ``hang_ms`` passes before the first event,
    with an SSE comment every ``keepalive_ms`` meanwhile (a server holding the line open)."""
    end = time.monotonic() + b.hang_ms / 1000
    while True:
        await resp.write(b": keepalive\n\n")
        left = end - time.monotonic()
        if left <= 0:
            return
        await asyncio.sleep(min(left, b.keepalive_ms / 1000))


def drop(request: web.Request) -> bool:
    """``x-fake-drop-after`` reached: cut the connection mid-stream. Returns False, the value a
    ``serve_stream`` producer returns for a stream that did not end cleanly."""
    request.app[STATE].stats["streams_dropped"] += 1
    cut(request)
    return False


async def serve_stream(
    request: web.Request, resp: web.StreamResponse, produce: Callable[[], Awaitable[bool]]
) -> web.StreamResponse:
    """Send a streamed answer: prepare ``resp``, let ``produce`` write the events (it returns
    False when it cut the stream), end it, and keep the stream counters of ``/_fake/stats``
    (started, in flight, completed, cancelled) the same for every fake API."""
    stats = request.app[STATE].stats
    stats["streams_started"] += 1
    stats["streams_in_flight"] += 1
    try:
        await resp.prepare(request)
        if await produce():
            await resp.write_eof()
            stats["streams_completed"] += 1
        return resp
    except asyncio.CancelledError:
        # The client went away and aiohttp cancelled the handler (handler_cancellation=True).
        stats["streams_cancelled"] += 1
        stats["last_cancelled_at"] = time.time()
        raise
    except ConnectionError:
        # Or the next write found the socket closed first: same outcome, nothing to log.
        stats["streams_cancelled"] += 1
        stats["last_cancelled_at"] = time.time()
        return resp
    finally:
        stats["streams_in_flight"] -= 1


async def get_requests(request: web.Request) -> web.Response:
    return web.Response(
        body=orjson.dumps(list(request.app[STATE].requests)), content_type="application/json"
    )


async def clear_requests(request: web.Request) -> web.Response:
    request.app[STATE].requests.clear()
    return web.Response(status=204)


async def get_stats(request: web.Request) -> web.Response:
    return web.Response(
        body=orjson.dumps(request.app[STATE].stats), content_type="application/json"
    )


async def clear_stats(request: web.Request) -> web.Response:
    request.app[STATE].reset_stats()
    return web.Response(status=204)
