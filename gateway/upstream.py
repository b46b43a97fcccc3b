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

from gateway import metrics
from gateway.accounting import fast_round
from gateway.context import RequestContext
from gateway.errors import (
    DeadlineExceededError,
    GatewayError,
    ServiceUnavailableError,
    UpstreamError,
    UpstreamTimeoutError,
)
from gateway.pipeline import hooked
from gateway.providers.base import TimeoutQueue, upstream_timeout
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
            ctx.attempt_log.append(
                {"deployment": dep_id, "provider": dep.provider, "status": err.status,
                 "error": err.type, "ms": fast_round(elapsed * 1000, 2)}
            )  # fmt: skip
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
    """One attempt under the request's deadline. An attempt with another candidate after it
    waits for its answer to begin at most half the time left (the first-byte timeout may cut
    it sooner), so the fallback still has time: a deployment that hangs is abandoned even when
    ``deadline_s`` is no longer than ``first_byte_timeout_s``, and that cut is its failure.
    The last candidate gets all the time left; a deadline cut counts against it when it had
    at least a quarter of the request's time (else the request ran out on earlier attempts)."""
    assert ctx.deadline is not None and ctx.upstream_started is not None
    left = max(0.0, ctx.deadline - started)
    share = left / 2 if ctx.candidates else left
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


async def first_bytes(
    resp: UpstreamResponse, deadlines: TimeoutQueue
) -> tuple[bytes, AsyncIterator[bytes]]:
    """Wait (at most the first-byte timeout) for the stream's first bytes; returns them and the
    iterator to go on."""
    it = aiter(resp.iter_bytes())
    try:
        with deadlines.start():
            while True:
                data = await anext(it)
                if data:
                    return data, it
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
