"""The request's path: read and validate the body, run the pipeline, call the upstream (with the
attempt plan), relay the answer, then run the response phase and account.

Written as plain ASGI (no Request/Response objects on the hot path) because this is where the
gateway spends its time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
from collections.abc import MutableMapping
from typing import TYPE_CHECKING, Any

import orjson

from gateway.accounting import account
from gateway.body import (
    MAX_JSON_DEPTH,
    check_content_type,
    check_depth,
    decode_body,
    read_body,
)
from gateway.context import RequestContext, Usage, usage_from
from gateway.disconnect import DisconnectWatch
from gateway.errors import (
    GatewayError,
    InvalidRequestError,
    MethodNotAllowedError,
    ModelNotFoundError,
    RequestTimeoutError,
    ServiceUnavailableError,
)
from gateway.headers import client_response_headers
from gateway.providers.secrets import scrub_bytes
from gateway.redact import find_secrets, redact
from gateway.sse import SSE_HEADERS
from gateway.stream import relay_stream
from gateway.upstream import open_upstream
from gateway.validate import validate_chat, validate_embeddings

if TYPE_CHECKING:
    from gateway.pipeline import Pipeline
    from gateway.plugin import Plugin
    from gateway.providers.base import UpstreamResponse
    from gateway.state import Gateway

log = logging.getLogger("gateway.proxy")

Scope = MutableMapping[str, Any]
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
JSON_HEADERS = [(b"content-type", b"application/json")]


def new_request_id(given: str | None) -> str:
    """The client's ``X-Request-ID`` when it is a plain id (one that looks like a key is not
    written to the log: a new one is made), else a new one."""
    if given and _REQUEST_ID.match(given) and not find_secrets(given):
        return given
    return os.urandom(12).hex()


def logged_model(name: str) -> str:
    """A model name the catalogue does not know, as the log, ledger and traces keep it: the
    client's text, cut to 100 characters, with anything shaped like a secret redacted (a key
    pasted into the wrong field)."""
    name = name[:100]
    hits = find_secrets(name)
    return redact(name, hits) if hits else name


#: Lower-cased header names by their raw bytes: the same few names arrive on every request.
_NAMES: dict[bytes, str] = {}
_MAX_NAMES = 512  # names are client-chosen: past this many, decode without caching


#: Encoded response header names (plugins set the same few on every request).
_RAW_NAMES: dict[str, bytes] = {}


def parse_headers(scope: Scope) -> tuple[dict[str, str], list[tuple[str, str]]]:
    joined: dict[str, str] = {}
    pairs: list[tuple[str, str]] = []
    names = _NAMES
    for raw_name, raw_value in scope["headers"]:
        name = names.get(raw_name)
        if name is None:
            name = raw_name.decode("latin-1").lower()
            if len(names) < _MAX_NAMES:
                names[raw_name] = name
        value = raw_value.decode("latin-1")
        pairs.append((name, value))
        joined[name] = joined[name] + ", " + value if name in joined else value
    return joined, pairs


def new_context(scope: Scope, endpoint: str) -> RequestContext:
    headers, pairs = parse_headers(scope)
    client = scope.get("client")
    # Positional: keyword arguments cost a third more in this dataclass's __init__.
    return RequestContext(
        new_request_id(headers.get("x-request-id")),  # request_id
        endpoint,
        scope["path"],
        scope["method"],
        headers,
        pairs,  # raw_headers
        {},  # body
        client[0] if client else "",
    )


def response_headers(
    ctx: RequestContext, extra: list[tuple[bytes, bytes]] | None = None
) -> list[tuple[bytes, bytes]]:
    out = [(b"x-request-id", ctx.request_id.encode())]
    names = _RAW_NAMES
    for name, value in ctx.response_headers.items():
        raw = names.get(name)
        if raw is None:
            raw = name.encode("latin-1")
            if len(names) < _MAX_NAMES:
                names[name] = raw
        text = value if type(value) is str else str(value)
        out.append((raw, text.encode("latin-1", "replace")))
    if extra:
        out.extend(extra)
    return out


async def send_error(send: Any, ctx: RequestContext, err: GatewayError) -> None:
    ctx.status = err.status
    ctx.error_type = err.type
    headers = response_headers(ctx, JSON_HEADERS)
    if ctx.attempts:  # (every deployment tried failed: how many were, for the operator)
        headers.append((b"x-gateway-attempts", str(ctx.attempts).encode()))
    for name, value in err.headers.items():
        headers.append((name.lower().encode("latin-1"), value.encode("latin-1")))
    body = err.body()
    headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def handle(gw: Gateway, scope: Scope, receive: Any, send: Any, endpoint: str) -> None:
    """``POST /v1/chat/completions`` and ``POST /v1/embeddings``."""
    ctx = new_context(scope, endpoint)
    if gw.tracer is not None:
        gw.tracer.start(ctx)
    ran: list[Plugin] = []
    responded = False
    gw.in_flight += 1  # (gateway_in_flight_requests reads it)
    try:
        if gw.pipeline.header_hooks:
            await gw.pipeline.run_headers(ctx)
        if ctx.method != "POST":
            raise MethodNotAllowedError(
                f"method {ctx.method} not allowed; use POST", headers={"allow": "POST"}
            )
        if ctx.headers.get("content-type") != "application/json":  # else check_content_type passes
            check_content_type(ctx)
        requests_cfg = gw.request_limits
        try:
            with gw.body_deadline.start():
                raw = await read_body(receive, ctx, requests_cfg.max_body_bytes)
        except TimeoutError:
            raise RequestTimeoutError(
                f"the request body did not arrive within {gw.body_deadline.delay:g} s"
            ) from None
        if "content-encoding" in ctx.headers:
            raw = decode_body(ctx, raw, requests_cfg.max_body_bytes)
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise InvalidRequestError("request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise InvalidRequestError("request body must be a JSON object")
        # (Nesting that deep takes that many brackets, and twice that many bytes.)
        if len(raw) > 2 * MAX_JSON_DEPTH and raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH:
            check_depth(body)
        ctx.body = body
        if endpoint == "chat":
            model = validate_chat(body, requests_cfg)
        else:
            model = validate_embeddings(body, requests_cfg)
        ctx.model = model
        entry = gw.catalogue.get(model)
        if entry is None or entry.kind != endpoint:
            ctx.model = logged_model(model)
            raise ModelNotFoundError(
                f"The model '{model[:100]}' does not exist or you do not have access to it.",
                param="model",
            )
        ctx.model_entry = entry
        ctx.stream = body.get("stream") is True
        ctx.deployment = entry.deployments[0]
        answer = await gw.pipeline.run_request(ctx, ran)
        if answer is not None:
            for name, value in ctx.response_headers.items():
                answer.headers[name] = str(value)
            answer.headers["x-request-id"] = ctx.request_id
            ctx.status = answer.status_code
            responded = True
            await answer(scope, receive, send)
        else:
            responded = await forward(gw, ctx, ran, scope, receive, send)
    except GatewayError as err:
        ctx.status, ctx.error_type = err.status, err.type
        if not ctx.model and type(asked := ctx.body.get("model")) is str:
            ctx.model = logged_model(asked)  # (a request refused before it was validated)
        if not responded:
            responded = True
            await send_error(send, ctx, err)
    except Exception:
        log.exception("unhandled error", extra={"request_id": ctx.request_id})
        ctx.status, ctx.error_type = 500, "server_error"
        if not responded:
            responded = True
            await send_error(send, ctx, GatewayError("internal error"))
    except asyncio.CancelledError:
        # Cancelled other than by the client leaving (forward and the relay handle that): the
        # server is stopping (its drain timeout passed) with this request unfinished. Whatever
        # went out, it did not complete: the log, the ledger and the plugins (the cache) must
        # not take it for a success. The client is told so, as an OpenAI error: a 503 if
        # nothing was sent yet, else a last SSE error event (uvicorn would answer a bare
        # text/plain 500, or cut the stream, and log a traceback).
        if ctx.client_disconnected:
            raise
        task = asyncio.current_task()
        if task is None or task.uncancel() > 0:
            ctx.error_type = ctx.error_type or "cancelled"
            raise  # cancelled more than once: no time to answer
        stopping = ServiceUnavailableError(
            "the gateway is shutting down; retry the request", headers={"retry-after": "1"}
        )
        with contextlib.suppress(Exception):
            if ctx.status == 0 and not responded:
                responded = True
                await send_error(send, ctx, stopping)
            elif ctx.stream and ctx.status == 200:
                event = b"data: " + stopping.body() + b"\n\n"
                await send({"type": "http.response.body", "body": event, "more_body": False})
        ctx.error_type = "cancelled"
    finally:
        try:
            if ctx.finished is None:
                ctx.finished = time.perf_counter()
            # (Without response hooks there is nothing to run: no coroutine for it.)
            if gw.pipeline.has_response_hooks and "response_done" not in ctx.scratch:
                await finish_response_phase(gw.pipeline, ran, ctx)
            account(gw, ctx)
        finally:
            # Last: draining waits for the count, so plugins (limit settle, cache) and the
            # log/ledger finish before shutdown closes their stores.
            gw.in_flight -= 1


async def finish_response_phase(
    pipeline: Pipeline, ran: list[Plugin], ctx: RequestContext
) -> GatewayError | None:
    """Run ``on_response`` of every plugin that ran, in reverse; all of them run even if one
    raises. Returns the first ``GatewayError`` raised."""
    ctx.scratch["response_done"] = {}
    first: GatewayError | None = None
    cancelled: asyncio.CancelledError | None = None
    for plugin in pipeline.response_hooks(ctx.endpoint, ran):
        try:
            await plugin.on_response(ctx)
        except GatewayError as err:
            if first is None:
                first = err
                ctx.status, ctx.error_type = err.status, err.type
        except asyncio.CancelledError as err:
            # Shutdown cut this plugin short: the others still give back what they hold
            # (concurrency slots, budget holds, probes) before the cancellation goes on.
            cancelled = err
        except Exception:
            log.exception(
                "plugin on_response failed",
                extra={"plugin": plugin.name, "request_id": ctx.request_id},
            )
    if cancelled is not None:
        raise cancelled
    return first


async def forward(
    gw: Gateway, ctx: RequestContext, ran: list[Plugin], scope: Scope, receive: Any, send: Any
) -> bool:
    """Call the upstream and relay its answer. Returns whether a response was started."""
    client_wants_usage = ctx.stream and bool(
        (ctx.body.get("stream_options") or {}).get("include_usage")
    )
    # A client that leaves while the attempts run (a slow first byte, fallbacks) or while a
    # stream is relayed cancels them: the upstream connection is dropped, so the provider
    # stops generating.
    watch = DisconnectWatch(receive, gw.watches)
    relaying = False  # the relay stops the watch (and handles a disconnect) from its start
    try:
        resp, start = await open_upstream(gw, ctx, ran)
        if not isinstance(start, dict):
            # (Built here: stream.py importing response_headers per request cost ~7k
            # instructions, and at its top it would be a circular import.)
            headers = response_headers(ctx, SSE_HEADERS)
            headers.extend(_answer_headers(ctx, resp))
            relaying = True
            await relay_stream(
                gw, ctx, ran, resp, start[0], start[1], headers, client_wants_usage, watch, send
            )
            return True
    except asyncio.CancelledError:
        if relaying or not watch.disconnected:
            raise
        watch.main.uncancel()
        ctx.client_disconnected = True
        ctx.status = 499  # (nginx's "client closed request": nothing was sent)
        return True
    finally:
        if not relaying:
            watch.stop()
    extra = _answer_headers(ctx, resp)
    data = start
    ctx.finished = time.perf_counter()
    ctx.response = data
    ctx.status = 200
    ctx.usage = usage_from(data, lambda: estimate_usage(ctx, data)) or estimate_usage(ctx, data)
    err = None
    try:
        if gw.pipeline.has_response_hooks:
            err = await finish_response_phase(gw.pipeline, ran, ctx)
    except asyncio.CancelledError:
        ctx.status = 0  # nothing was sent: the handler answers the shutdown with a 503
        raise
    if err is not None:
        raise err
    out = orjson.dumps(ctx.response)
    for mark in resp.mark_bytes:  # (an upstream quoting the request's credentials)
        if out.find(mark) != -1:
            out = scrub_bytes(out, resp.secret_bytes)
            break
    headers = response_headers(ctx, JSON_HEADERS)
    headers.extend(extra)
    headers.append((b"content-length", str(len(out)).encode()))
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": out})
    return True


def _answer_headers(ctx: RequestContext, resp: UpstreamResponse) -> list[tuple[bytes, bytes]]:
    """The response headers that describe the upstream answer and how it was obtained."""
    extra = client_response_headers(resp.headers, resp.secret_marks)
    extra.append((b"x-gateway-model", ctx.model.encode("latin-1", "replace")))
    if ctx.deployment is not None:
        extra.append((b"x-gateway-provider", ctx.deployment.provider.encode()))
    extra.append((b"x-gateway-attempts", str(ctx.attempts).encode()))
    return extra


def estimate_usage(ctx: RequestContext, data: dict[str, Any]) -> Usage:
    from gateway import tokens

    texts: list[str] = []
    for choice in data.get("choices") or ():
        msg = choice.get("message") if isinstance(choice, dict) else None
        if isinstance(msg, dict):
            texts.extend(tokens.generated_texts(msg))
    return tokens.estimated_usage(ctx, "".join(texts))
