"""Relaying a streamed completion: upstream SSE bytes reach the client as they arrive.

Two paths:

* fast: no plugin looks at chunks, so complete SSE events are forwarded as raw bytes; only an
  event carrying ``"usage":{`` is parsed (to account, and dropped if the client did not ask for
  usage: the gateway always asks the upstream for it).
* parsed: some plugin has ``on_chunk``/``on_chunks``/``on_stream_end`` (the output guard), so
  events are parsed and re-serialised. The complete events of one upstream read (a "block": on a
  fast upstream, often the whole answer) are parsed together, runs of text events in the same
  envelope as one chunk (``gateway.envelope``), and go through the hooks as one list
  (``on_chunks``), in reverse pipeline order. When every hook takes a ``TextChunk``, a run stays
  its text alone and is written straight back into the envelope's bytes. The client only ever
  gets chunks serialised from what the hooks returned, never raw chunk bytes the hooks did not
  see.

Once the status line has been sent, any failure (upstream drop, a plugin ending the stream)
becomes one final SSE error event. A client disconnect cancels the relay at once, which closes
the upstream connection so the provider stops generating (and billing).
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

import orjson

from gateway import metrics
from gateway.context import UNREPORTED, ReportedUsage, Usage, reported_usage
from gateway.disconnect import DisconnectWatch
from gateway.envelope import Envelope, TextChunk, join_reads
from gateway.errors import GatewayError, UpstreamError, UpstreamTimeoutError
from gateway.pipeline import Pipeline, hooked
from gateway.plugin import CHUNK_HOOKS
from gateway.providers.secrets import scrub, scrub_bytes
from gateway.sse import (
    DONE,
    as_events,
    error_event,
    event_data,
    upstream_failed,
    usage_at,
)
from gateway.tokens import generated_texts

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from gateway.context import RequestContext
    from gateway.plugin import Plugin
    from gateway.providers.base import UpstreamResponse
    from gateway.state import Gateway


class _Relay:
    def __init__(
        self, ctx: RequestContext, hooks: list[Plugin], client_wants_usage: bool,
        keep_text: bool = False,
    ) -> None:  # fmt: skip
        self.ctx = ctx
        #: Keep every forwarded event so the completion text can be logged.
        self.keep_text = keep_text
        self.hooks = hooks
        self.client_wants_usage = client_wants_usage
        self.buffer = b""
        #: Bytes produced but not sent yet (held after [DONE] to coalesce the last write).
        self.pending = b""
        self.usage: Usage | None = None
        self.reported: ReportedUsage | None = None  # the last usage event
        self.saw_done = False
        #: Forwarded events kept until the upstream's usage shows up (then dropped), so the
        #: completion can still be counted if it never does (all of them with ``keep_text``).
        #: Parsed mode keeps what it sent, after the plugins' changes, for the log only.
        self.kept: list[bytes] = []
        #: Parsed mode: the upstream's blocks as they came, until its usage shows up: what the
        #: model generated (the provider bills it) is counted from these if it never does,
        #: also text the plugins held back or refused (the output guard ending the stream).
        self.generated: list[bytes] = []
        #: Parsed mode: the stream's envelope, and whether the hooks take a run of text in it as
        #: a ``TextChunk`` (else it becomes a dict).
        self.envelope = Envelope() if hooks else None
        self.text_chunks = bool(hooks) and all([h.text_chunks for h in hooks])
        #: Whether the plugins' stream end ran (what they held was released).
        self.ended = False
        #: The deployment's credentials (UTF-8): cut out of whatever the upstream sends, should
        #: it quote the request's (a server echoing headers into an error event).
        self.secrets: tuple[bytes, ...] = ()
        #: The upstream's error event, once one ended the answer (it goes out last, after what
        #: the plugins still hold, and without ``[DONE]``).
        self.failed: bytes | None = None
        self.marks: tuple[bytes, ...] = ()  # (their leading bytes: providers.base.marks)

    async def feed(self, data: bytes) -> bytes:
        """Take upstream bytes; return what to send to the client now."""
        if self.saw_done:
            return b""  # nothing after [DONE] is part of the answer
        buf = join_reads(self.buffer, data)
        cut = buf.rfind(b"\n\n")
        if cut == -1:
            self.buffer = buf
            return b""
        complete, self.buffer = buf[: cut + 2], buf[cut + 2 :]
        done = complete.find(DONE)
        if done != -1 and done + len(DONE) != len(complete):
            # Events after [DONE] in the same read: dropped, as later reads are (an upstream
            # that went on used to have them spliced into the answer).
            complete, self.buffer = complete[: done + len(DONE)], b""
        for mark in self.marks:  # (events are whole here: no secret is cut in two)
            if complete.find(mark) != -1:
                complete = scrub_bytes(complete, self.secrets)  # (then no mark is left)
        return await (self._parsed(complete) if self.hooks else self._fast(complete))

    def _fail(self, event: bytes) -> None:
        """The upstream ended the answer with an error event: the request failed, whatever came
        before (the log says so, the breaker counts it, nothing caches it), and nothing after
        the event is relayed."""
        self.failed = event
        self.saw_done = True
        self.buffer = b""
        self.ctx.error_type = "upstream_error"
        upstream_failed(self.ctx, "upstream_error")

    async def _fast(self, complete: bytes) -> bytes:
        if complete.endswith(DONE):
            self.saw_done = True
            complete = complete[: -len(DONE)]
        found = error_event(complete)
        if found is not None:
            start, end, _ = found
            self._fail(complete[start:end])
            complete = complete[:start]
        if self.keep_text or self.usage is None:
            self.kept.append(complete)
        at = usage_at(complete)
        if at == -1:
            return complete
        # Only the events carrying usage are parsed; the bytes around them pass as they came.
        out: list[bytes] = []
        done = 0  # complete[:done] is decided
        while at != -1:
            start = complete.rfind(b"\n\n", done, at)
            start = done if start == -1 else start + 2
            end = complete.find(b"\n\n", at) + 2  # complete ends with an event's "\n\n"
            if self._take_usage(complete[start : end - 2]):
                out.append(complete[done:start])
                done = end
            at = usage_at(complete, end)
        out.append(complete[done:])
        return b"".join(out)

    def _take_usage(self, event: bytes) -> bool:
        """Record the usage in ``event``; True if the event should be dropped."""
        payload = event_data(event)
        try:
            obj = orjson.loads(payload) if payload else None
        except orjson.JSONDecodeError:
            return False
        if not isinstance(obj, dict):
            return False
        return self._usage_of(obj)

    def _usage_of(self, obj: dict[str, Any]) -> bool:
        """Record the usage in the parsed event ``obj``; True if the event should be dropped."""
        reported = reported_usage(obj)
        if reported is not None:
            self.reported = reported  # (a count missing: the text stays, for an estimate)
            if reported.complete:
                self.usage = reported.usage()
                self.generated.clear()
                if not self.keep_text:
                    self.kept.clear()
        return not obj.get("choices") and not self.client_wants_usage

    async def _parsed(self, complete: bytes) -> bytes:
        if complete.endswith(DONE):
            self.saw_done = True
            complete = complete[: -len(DONE)]
        if self.usage is None:
            self.generated.append(complete)
        assert self.envelope is not None
        if self.text_chunks:
            # One text event per read (a model generating tokens): no lists to build.
            chunk = self.envelope.single(complete)
            if chunk is not None:
                return self._keep(
                    as_events(await Pipeline.run_chunks(self.hooks, self.ctx, [chunk]))
                )
        objs = self.envelope.parse(complete)
        if objs is None:
            objs = self._objects(complete)
        try:
            return await self._parsed_objects(objs)
        except GatewayError:
            # A plugin ended the stream on this block: a usage event in it still counts (the
            # output guard refusing the answer does not make it free).
            for obj in objs:
                if type(obj) is dict and isinstance(obj.get("usage"), dict):
                    self._usage_of(obj)
            raise

    async def _parsed_objects(self, objs: list[Any]) -> bytes:
        out: list[bytes] = []
        run: list[Any] = []  # chunks for the hooks, in order
        for obj in objs:
            if type(obj) is TextChunk:
                run.append(obj if self.text_chunks else obj.as_dict())
                continue
            if not isinstance(obj, dict):
                continue
            if "error" not in obj and obj.get("choices"):
                if isinstance(obj.get("usage"), dict):
                    # Usage in a chunk that also has choices (some upstreams put it in the
                    # last one): counted, and the chunk goes on.
                    self._usage_of(obj)
                run.append(obj)
                continue
            # Not a chunk: what the hooks returned so far goes first, to keep the order.
            if run:
                out.append(as_events(await Pipeline.run_chunks(self.hooks, self.ctx, run)))
                run = []
            if "error" in obj:
                # The upstream ended the answer with an error (vLLM does): it goes out at the
                # end, after what the plugins hold (end()); the rest of the block is dropped.
                self._fail(b"data: " + orjson.dumps(obj) + b"\n\n")
                break
            if isinstance(obj.get("usage"), dict):
                self._usage_of(obj)
                if self.client_wants_usage:
                    out.append(b"data: " + orjson.dumps(obj) + b"\n\n")
        if run:
            out.append(as_events(await Pipeline.run_chunks(self.hooks, self.ctx, run)))
        return self._keep(out[0] if len(out) == 1 else b"".join(out))

    def _objects(self, complete: bytes) -> list[Any]:
        """The parsed payloads of ``complete``, event by event (any SSE framing)."""
        objs: list[Any] = []
        for event in complete.split(b"\n\n"):
            payload = event_data(event) if event else None
            if payload is None:
                continue
            if payload == b"[DONE]":
                self.saw_done = True
                continue
            try:
                objs.append(orjson.loads(payload))
            except orjson.JSONDecodeError:
                raise UpstreamError("the upstream sent a malformed stream event") from None
        return objs

    def _keep(self, data: bytes) -> bytes:
        """Parsed mode: keep what the client gets when its text is logged."""
        if data and self.keep_text:
            self.kept.append(data)
        return data

    async def end(self) -> bytes:
        """The upstream is done: return the last bytes for the client (held chunks, [DONE], or
        the upstream's error event that ended the answer)."""
        if self.failed is not None:
            out = b""
            if self.hooks:
                self.ended = True
                out = self._keep(as_events(await Pipeline.run_stream_end(self.hooks, self.ctx)))
            return out + self.failed
        out = await self.feed(b"\n\n") if self.buffer.strip() else b""
        if self.hooks:
            self.ended = True
            out += self._keep(as_events(await Pipeline.run_stream_end(self.hooks, self.ctx)))
        if not self.saw_done:
            self.pending = out
            raise UpstreamError("the upstream stream ended before it was complete")
        return out + DONE

    def completion_text(self, generated: bool = False) -> str:
        """The text the client received, parsed back from the kept events (to log it).
        ``generated``: what the model produced, to count it when the upstream sent no usage:
        the upstream's own blocks in parsed mode, and tool calls' names and arguments and
        refusals too."""
        blocks = self.generated if generated and self.hooks else self.kept
        parts: list[str] = []
        for block in blocks:
            for event in block.split(b"\n\n"):
                payload = event_data(event)
                if not payload or payload == b"[DONE]":
                    continue
                try:
                    obj = orjson.loads(payload)
                except orjson.JSONDecodeError:
                    continue
                for choice in obj.get("choices") or () if isinstance(obj, dict) else ():
                    delta = choice.get("delta") if isinstance(choice, dict) else None
                    if not isinstance(delta, dict):
                        continue
                    if generated:
                        parts.extend(generated_texts(delta))
                    elif isinstance(delta.get("content"), str):
                        parts.append(delta["content"])
        return "".join(parts)

    def final_usage(self) -> Usage:
        if self.usage is not None:
            return self.usage
        from gateway.tokens import estimated_usage

        reported = self.reported or UNREPORTED  # a count missing: the gateway's estimate
        return reported.usage(lambda: estimated_usage(self.ctx, self.completion_text(True)))


async def relay_stream(
    gw: Gateway,
    ctx: RequestContext,
    ran: list[Plugin],
    resp: UpstreamResponse,
    first: bytes,
    it: AsyncIterator[bytes],
    headers: list[tuple[bytes, bytes]],
    client_wants_usage: bool,
    watch: DisconnectWatch,
    send: Any,
) -> None:
    """Relay the stream to the client with the response ``headers``; ``watch`` (stopped here)
    notices a client that leaves."""
    hooks = hooked(ran, *CHUNK_HOOKS) if gw.pipeline.has_chunk_hooks else []
    keep_text = gw.include_text
    relay = _Relay(ctx, hooks, client_wants_usage, keep_text)
    relay.secrets, relay.marks = resp.secret_bytes, resp.mark_bytes
    ctx.status = 200
    final = b""
    #: Whether an error now comes from the upstream's stream (a provider's error event, a cut,
    #: a stall), not from the plugins (the output guard ending the answer).
    reading = False
    try:
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        relay.pending = await relay.feed(first)
        metrics.observe_ttft(ctx, time.perf_counter() - ctx.started)
        # Forward each read at once, except after [DONE]: then only the end of the upstream
        # body can follow, and the last bytes go out in one write with the terminating chunk.
        if not relay.saw_done and relay.pending:
            await send({"type": "http.response.body", "body": relay.pending, "more_body": True})
            relay.pending = b""
        reading = relay.failed is None  # (an error event in the first read ended it)
        if reading:
            async for data in it:
                reading = False
                relay.pending += await relay.feed(data)
                if relay.failed is not None:
                    break  # (the upstream's error event ended the answer)
                if relay.pending and not relay.saw_done:
                    await send(
                        {"type": "http.response.body", "body": relay.pending, "more_body": True}
                    )
                    relay.pending = b""
                reading = True
            reading = False
        if relay.saw_done and relay.failed is None and not relay.hooks:
            final = relay.pending + DONE  # (what end() gives then, without its coroutine)
        else:
            final = relay.pending + await relay.end()
    except GatewayError as err:
        tail = b""
        upstream = reading or isinstance(err, (UpstreamError, UpstreamTimeoutError))
        if relay.hooks and not relay.ended and upstream:
            # The upstream failed after output: what the plugins still hold (the output guard's
            # last word) goes out checked, before the error event, as at a stream's end.
            try:
                tail = relay._keep(as_events(await Pipeline.run_stream_end(relay.hooks, ctx)))
            except GatewayError as refused:  # (the held text ended the answer itself)
                err = refused
        ctx.error_type = err.type
        if upstream and err.deployment_fault and err.status >= 429:
            # (A provider's error event counts when it speaks of the deployment: overloaded,
            # rate limited, failing; not an error about the request itself.)
            upstream_failed(ctx, err.type)
        err.message = scrub(err.message, resp.secrets)  # (an error event may quote the key)
        final = relay.pending + tail + b"data: " + err.body() + b"\n\n"
    except asyncio.CancelledError:
        if not watch.disconnected:
            raise
        watch.main.uncancel()
        ctx.client_disconnected = True
    finally:
        watch.stop()
        resp.close()
        ctx.finished = time.perf_counter()
        ctx.usage = relay.final_usage()
        if keep_text:
            # (A key the upstream spelt over several events is whole again in the text.)
            ctx.completion_text = scrub(relay.completion_text(), resp.secrets)
    if not ctx.client_disconnected:
        await send({"type": "http.response.body", "body": final, "more_body": False})
