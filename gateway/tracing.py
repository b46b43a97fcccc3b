"""Optional OpenTelemetry tracing: one SERVER span per proxied request and one CLIENT span per
upstream attempt, with the GenAI semantic conventions (``gen_ai.*``), and the trace context
propagated upstream (``traceparent`` through ``ctx.upstream_headers``).

Off by default and then free: ``Gateway.tracer`` is None, the request path checks that once,
and OpenTelemetry is not even imported. The tracer provider is our own (not the global one), so
it cannot clash with an application's.

Attempt spans are recorded when the request ends, from ``ctx.attempt_log`` (durations of the
attempts, back to back from the first one's start), so the request path carries no tracing calls
between attempts; the upstream receives the request span as its parent.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.config import TracingConfig
    from gateway.context import RequestContext

#: Client headers replaced by ours (our request span is their child), so they are not sent twice.
_TRACE_HEADERS = frozenset({"traceparent", "tracestate"})
_REQUEST_PARAMS = {
    "max_tokens": "gen_ai.request.max_tokens",
    "max_completion_tokens": "gen_ai.request.max_tokens",
    "temperature": "gen_ai.request.temperature",
    "top_p": "gen_ai.request.top_p",
    "frequency_penalty": "gen_ai.request.frequency_penalty",
    "presence_penalty": "gen_ai.request.presence_penalty",
    "seed": "gen_ai.request.seed",
}


class Tracing:
    def __init__(self, config: TracingConfig, models: dict[str, str] | None = None) -> None:
        from opentelemetry.propagators.textmap import DefaultGetter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.config = config
        #: Deployment id -> upstream model name, for the attempt spans.
        self.models = models or {}
        self.provider = TracerProvider(
            resource=Resource.create({"service.name": config.service_name}),
            sampler=ParentBased(TraceIdRatioBased(config.sample_ratio)),
        )
        self.exporter: Any
        if config.exporter == "memory":
            from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
                InMemorySpanExporter,
            )

            self.exporter = InMemorySpanExporter()
            self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        elif config.exporter == "console":
            import sys

            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            self.exporter = ConsoleSpanExporter(out=sys.stderr)
            self.provider.add_span_processor(BatchSpanProcessor(self.exporter))
        else:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            self.exporter = OTLPSpanExporter(endpoint=config.endpoint, insecure=True)
            self.provider.add_span_processor(BatchSpanProcessor(self.exporter))
        self.tracer = self.provider.get_tracer("secure-llm-gateway")
        self.propagator = TraceContextTextMapPropagator()
        self._getter = DefaultGetter()

    # -- request start (called by gateway.proxy.handle) -----------------------------------------

    def start(self, ctx: RequestContext) -> None:
        from opentelemetry.trace import SpanKind, set_span_in_context

        parent = self.propagator.extract(ctx.headers, getter=self._getter)
        span = self.tracer.start_span(
            ctx.endpoint, context=parent, kind=SpanKind.SERVER, start_time=time.time_ns()
        )
        ctx.scratch_for("tracing")["span"] = span
        if any(name in _TRACE_HEADERS for name, _ in ctx.raw_headers):
            ctx.raw_headers = [(n, v) for n, v in ctx.raw_headers if n not in _TRACE_HEADERS]
        self.propagator.inject(ctx.upstream_headers, context=set_span_in_context(span))

    # -- request end (a gateway observer) --------------------------------------------------------

    def __call__(self, ctx: RequestContext, record: dict[str, Any]) -> None:
        from opentelemetry.trace import SpanKind, Status, StatusCode, set_span_in_context

        span = ctx.scratch.get("tracing", {}).get("span")
        if span is None:
            return
        now_ns, now_perf = time.time_ns(), time.perf_counter()

        def wall(perf: float) -> int:
            return now_ns - int((now_perf - perf) * 1e9)

        op = "embeddings" if ctx.endpoint == "embeddings" else "chat"
        model = record.get("model") or ""
        span.update_name(f"{op} {model}".strip())
        attrs: dict[str, Any] = {
            "gen_ai.operation.name": op,
            "gen_ai.request.model": model,
            "gateway.request_id": ctx.request_id,
            "gateway.attempts": ctx.attempts,
            "gateway.stream": ctx.stream,
            "http.response.status_code": ctx.status,
        }
        for field, name in _REQUEST_PARAMS.items():
            value = ctx.body.get(field)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                attrs[name] = value
        if record.get("provider"):
            attrs["gen_ai.provider.name"] = attrs["gen_ai.system"] = record["provider"]
        if record.get("model_used"):
            attrs["gen_ai.response.model"] = record["model_used"]
        if "prompt_tokens" in record:
            attrs["gen_ai.usage.input_tokens"] = record["prompt_tokens"]
            attrs["gen_ai.usage.output_tokens"] = record["completion_tokens"]
        if record.get("cost_usd") is not None:
            attrs["gateway.cost_usd"] = record["cost_usd"]
        if record.get("tenant"):
            attrs["gateway.tenant"] = record["tenant"]
        response = ctx.response
        if isinstance(response, dict):
            if isinstance(response.get("id"), str):
                attrs["gen_ai.response.id"] = response["id"]
            reasons = [
                c["finish_reason"]
                for c in response.get("choices") or ()
                if isinstance(c, dict) and isinstance(c.get("finish_reason"), str)
            ]
            if reasons:
                attrs["gen_ai.response.finish_reasons"] = reasons
        if ctx.status >= 400 or ctx.error_type:
            attrs["error.type"] = ctx.error_type or str(ctx.status)
            span.set_status(Status(StatusCode.ERROR))
        span.set_attributes(attrs)
        finished = ctx.finished or now_perf
        self._attempt_spans(ctx, span, op, wall, finished, SpanKind.CLIENT, set_span_in_context)
        span.end(end_time=wall(finished))

    def _attempt_spans(self, ctx: RequestContext, parent: Any, op: str, wall: Any,
                       finished: float, kind: Any, in_context: Any) -> None:  # fmt: skip
        from opentelemetry.trace import Status, StatusCode

        if ctx.upstream_started is None or not ctx.attempt_log:
            return
        t = ctx.upstream_started
        last = len(ctx.attempt_log) - 1
        for i, attempt in enumerate(ctx.attempt_log):
            end = t + attempt["ms"] / 1000
            if attempt.get("skipped"):  # (nothing was sent: no client span)
                t = end
                continue
            if i == last and attempt["error"] is None:
                end = max(end, finished)  # the body (stream) is part of the attempt
            dep_model = self.models.get(attempt["deployment"], "")
            span = self.tracer.start_span(
                f"{op} {dep_model}".strip(), context=in_context(parent), kind=kind,
                start_time=wall(t),
            )  # fmt: skip
            span.set_attributes({
                "gen_ai.operation.name": op,
                "gen_ai.request.model": dep_model,
                "gen_ai.provider.name": attempt["provider"],
                "gateway.deployment": attempt["deployment"],
                "gateway.attempt": i + 1,
                "http.response.status_code": attempt["status"],
            })  # fmt: skip
            if attempt["error"]:
                span.set_attribute("error.type", attempt["error"])
                span.set_status(Status(StatusCode.ERROR))
            span.end(end_time=wall(end))
            t = end

    def shutdown(self) -> None:
        self.provider.shutdown()
