"""The attempt plan: call the deployments a request may use, in order, until one answers.

A deployment that fails before anything reached the client (an error status, a timeout, a
stream that sent nothing before its first-byte timeout) is logged, counted and, when the error
is retryable, followed by the next one; the routing plugin orders ``ctx.candidates`` and sees
each outcome through ``on_attempt``. The request's deadline bounds every attempt.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import orjson

from gateway import metrics
from gateway.accounting import fast_round
from gateway.context import RequestContext
from gateway.errors import (
    DeadlineExceededError,
    GatewayError,
    ServiceUnavailableError,
    UnsupportedByDeploymentError,
    UpstreamError,
    UpstreamTimeoutError,
)
from gateway.pipeline import hooked
from gateway.providers.base import TimeoutQueue, upstream_timeout
from gateway.providers.secrets import scrub
from gateway.sse import ERROR_KEY, event_data
from gateway.validate import EXTENSION_FIELDS

if TYPE_CHECKING:
    from gateway.plugin import Plugin
    from gateway.providers.base import Provider, UpstreamResponse
    from gateway.state import Gateway


def upstream_body(ctx: RequestContext, model: str) -> dict[str, Any]:
    if EXTENSION_FIELDS.isdisjoint(ctx.body):
        return {**ctx.body, "model": model}
    body = {k: v for k, v in ctx.body.items() if k not in EXTENSION_FIELDS}
    body["model"] = model
    return body


#: What an attempt that succeeded returns beside the response: a stream's first bytes and the
#: iterator to go on, or a plain answer's parsed body.
Start = tuple[bytes, AsyncIterator[bytes]] | dict[str, Any]


async def open_upstream(
    gw: Gateway, ctx: RequestContext, ran: list[Plugin]
) -> tuple[UpstreamResponse, Start]:
    """Try the attempt plan in order until one deployment answers 2xx with, for a stream, its
    first bytes, and for a plain answer, its whole body: nothing has reached the client yet, so
    failing over is safe (a body cut short or not JSON is that deployment's failure)."""
    if not ctx.candidates:
        assert ctx.deployment is not None
        ctx.candidates = [ctx.deployment]
    hooks = hooked(ran, "on_attempt") if gw.pipeline.has_attempt_hooks else []
    last: GatewayError | None = None
    while ctx.candidates:
        if ctx.deadline is not None and time.perf_counter() >= ctx.deadline:
            break
        dep = ctx.candidates.pop(0)
        dep_id = dep.id  # a pydantic model: read once
        provider = gw.providers[dep_id]
        ctx.deployment = dep
        ctx.attempts += 1
        started = time.perf_counter()
        if ctx.upstream_started is None:
            ctx.upstream_started = started
        body = upstream_body(ctx, dep.model)
        try:
            if ctx.deadline is None:
                resp, start = await attempt(gw, ctx, provider, body)
            else:
                resp, start = await _within_deadline(gw, ctx, provider, body, started)
        except GatewayError as err:
            elapsed = time.perf_counter() - started
            last = err
            entry = {"deployment": dep_id, "provider": dep.provider, "status": err.status,
                     "error": err.type, "ms": fast_round(elapsed * 1000, 2)}  # fmt: skip
            if isinstance(err, UnsupportedByDeploymentError):
                # The provider cannot express the request: nothing was sent, so it is no
                # attempt (x-gateway-attempts, the log's attempts), only a skipped entry.
                ctx.attempts -= 1
                entry["skipped"] = True
            ctx.attempt_log.append(entry)
            if err.retryable and err.deployment_fault:
                # The deployment's failures, as its breaker counts them: not the request's
                # own (400, 413, 422), nor a skip, nor a deadline that ran out elsewhere.
                metrics.UPSTREAM_ERRORS.labels(dep_id, err.type).inc()
            for plugin in hooks:
                await plugin.on_attempt(ctx, dep, err, elapsed)
            if not err.retryable:
                raise
            continue
        now = time.perf_counter()
        elapsed = now - started
        ctx.upstream_first_byte = now
        ctx.attempt_log.append(
            {"deployment": dep_id, "provider": dep.provider, "status": resp.status,
             "error": None, "ms": fast_round(elapsed * 1000, 2)}
        )  # fmt: skip
        for plugin in hooks:
            await plugin.on_attempt(ctx, dep, None, elapsed)
        return resp, start
    if last is not None:
        raise last
    raise ServiceUnavailableError("no deployment is available for this model")


async def _within_deadline(
    gw: Gateway, ctx: RequestContext, provider: Provider, body: dict[str, Any], started: float
) -> tuple[UpstreamResponse, Start]:
    """One attempt under the request's deadline. A streamed attempt with another candidate
    after it waits for its answer to begin at most half the time left (the first-byte timeout
    may cut it sooner), so the fallback still has time: a deployment that hangs is abandoned
    even when ``deadline_s`` is no longer than ``first_byte_timeout_s``, and that cut is its
    failure. A plain answer's first byte comes when the whole answer is written, so it gets
    all the time left (a long answer is not cut for a fallback that would take as long), as
    does the last candidate; a deadline cut counts against the deployment when it had at least
    a quarter of the request's time (else the request ran out on earlier attempts), so a
    deployment that hangs opens its breaker and later requests go to the fallback."""
    assert ctx.deadline is not None and ctx.upstream_started is not None
    left = max(0.0, ctx.deadline - started)
    share = left / 2 if ctx.candidates and ctx.stream else left
    try:
        with upstream_timeout(share):
            return await attempt(gw, ctx, provider, body)
    except TimeoutError:
        if share < left:
            raise UpstreamTimeoutError(
                f"the upstream sent nothing within this attempt's share of the request deadline"
                f" ({share:.3g} s)",
                retryable=True,
            ) from None
        err = DeadlineExceededError(
            "the request deadline passed before the upstream answered", retryable=True
        )
        err.deployment_fault = left >= (ctx.deadline - ctx.upstream_started) / 4
        raise err from None


async def attempt(
    gw: Gateway, ctx: RequestContext, provider: Provider, body: dict[str, Any]
) -> tuple[UpstreamResponse, Start]:
    if ctx.endpoint == "embeddings":
        resp = await provider.embeddings(ctx, body)
    else:
        resp = await provider.chat(ctx, body)
    if ctx.stream:
        return resp, await first_bytes(resp, provider.first_byte_timeout)
    try:
        return resp, await resp.json()
    finally:
        resp.close()


#: How much of a stream's opening (comments, a role-only chunk) is held at most while waiting
#: for its answer to begin; past it the relay takes the stream as it is.
MAX_OPENING = 64 * 1024


async def first_bytes(
    resp: UpstreamResponse, deadlines: TimeoutQueue
) -> tuple[bytes, AsyncIterator[bytes]]:
    """Wait (at most the first-byte timeout) for the stream's answer to begin; returns the bytes
    so far and the iterator to go on.

    SSE comments (keep-alives) and an opening chunk with only the role (OpenAI-compatible
    servers send it before the model has produced anything) do not begin the answer: they are
    held, as the Anthropic provider holds ``message_start``'s role chunk, so an error event
    (vLLM sends one with status 200), a timeout or a dropped connection before the first real
    event is still this deployment's retryable failure, with nothing sent to the client."""
    it = aiter(resp.iter_bytes())
    held = b""
    try:
        with deadlines.start():
            while not held:
                held = await anext(it)
        # Bytes came: the upstream is alive. Until its answer begins (keep-alive comments, as
        # OpenRouter sends while a reasoning model thinks; a role-only chunk), each read is
        # bounded by the read timeout, as in the rest of the stream: a live upstream is waited
        # for, one that stalls fails over.
        while not begun(held, resp.secrets):
            data = await anext(it)
            if data:
                held += data
        return held, it
    except StopAsyncIteration:
        pass
    except TimeoutError:
        resp.close()
        raise UpstreamTimeoutError(
            "the upstream sent nothing before the first-byte timeout", retryable=True
        ) from None
    except BaseException:
        resp.close()
        raise
    resp.close()
    raise UpstreamError("the upstream closed the stream before sending anything", retryable=True)


def begun(buf: bytes, secrets: tuple[str, ...] = ()) -> bool:
    """Whether ``buf``, a stream's opening, holds a complete event that begins the answer (or
    is too long to hold). Raises the retryable ``UpstreamError`` for an error event."""
    if len(buf) > MAX_OPENING:
        return True
    if buf.find(b"\r") != -1:  # (CRLF framing, as the SSE spec allows)
        buf = buf.replace(b"\r\n", b"\n")
    at = 0
    maybe_role: list[bytes] = []  # events with a role: parsed only if nothing after decides
    while (cut := buf.find(b"\n\n", at)) != -1:
        start, at = at, cut + 2
        if not buf.startswith(b"data:", start) and buf.find(b"\ndata:", start, cut) == -1:
            continue  # a comment (": keepalive") or an event without data
        if buf.find(ERROR_KEY, start, cut) != -1:
            obj = _data(buf[start:cut])
            if isinstance(obj, dict) and obj.get("error"):
                raise _error_event(obj["error"], secrets)
            return True
        if buf.find(b'"role"', start, cut) == -1:
            return True  # (the usual content chunk, after the role chunk: nothing to parse)
        maybe_role.append(buf[start:cut])
    for event in maybe_role:
        obj = _data(event)
        if not isinstance(obj, dict) or not _role_only(obj):
            return True
    return False


def _data(event: bytes) -> Any:
    """The parsed data of one SSE event (None when it is not JSON: ``[DONE]``, or malformed,
    which the relay judges)."""
    data = event_data(event)
    try:
        return orjson.loads(data) if data else None
    except orjson.JSONDecodeError:
        return None


def _role_only(chunk: dict[str, Any]) -> bool:
    """A chunk whose choices carry nothing but the role (``{"role": "assistant", "content":
    ""}``): no text, tool call, refusal or finish reason yet."""
    choices = chunk.get("choices")
    if not isinstance(choices, list) or not choices or isinstance(chunk.get("usage"), dict):
        return False
    for choice in choices:
        delta = choice.get("delta") if isinstance(choice, dict) else None
        if not isinstance(delta, dict) or choice.get("finish_reason"):
            return False
        if any(value for key, value in delta.items() if key != "role"):
            return False
    return True


def _error_event(error: Any, secrets: tuple[str, ...]) -> UpstreamError:
    message = error.get("message") if isinstance(error, dict) else error
    text = scrub(str(message or "")[:500], secrets)
    return UpstreamError(
        f"the upstream stream began with an error: {text}".rstrip(": "), retryable=True
    )
