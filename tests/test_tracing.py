"""OpenTelemetry tracing through the real gateway, with the in-memory exporter: one SERVER span
per request with the GenAI attributes, one CLIENT span per upstream attempt, the trace context
sent upstream, and nothing at all when tracing is off."""

from __future__ import annotations

import time
from typing import Any

import httpx
from opentelemetry.trace import SpanKind, StatusCode

from tests.helpers import demo_model, running_gateway

CHAT = {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50,
        "temperature": 0.5}  # fmt: skip
TRACING = {"enabled": True, "exporter": "memory"}


def spans(gw: Any, at_least: int = 1) -> list[Any]:
    """Finished spans; the request span ends just after the answer is sent, so wait for it."""
    exporter = gw.gateway.tracer.exporter
    deadline = time.monotonic() + 5
    while not any(s.kind == SpanKind.SERVER for s in exporter.get_finished_spans()):
        assert time.monotonic() < deadline, "no request span"
        time.sleep(0.01)
    got = list(exporter.get_finished_spans())
    assert len(got) >= at_least
    return got


def test_request_and_attempt_spans_follow_genai_conventions() -> None:
    with running_gateway(tracing=TRACING) as gw:
        r = httpx.post(f"{gw.url}/v1/chat/completions", json=CHAT, timeout=20)
        assert r.status_code == 200
        got = spans(gw)
        sent = gw.upstream_requests()[0]["headers"]
    server = [s for s in got if s.kind == SpanKind.SERVER]
    client = [s for s in got if s.kind == SpanKind.CLIENT]
    assert len(server) == 1 and len(client) == 1
    req, att = server[0], client[0]
    a = req.attributes
    assert req.name == "chat demo"
    assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.request.model"] == "demo"
    assert a["gen_ai.response.model"] == "demo-upstream" and a["gen_ai.provider.name"] == "openai"
    assert a["gen_ai.usage.input_tokens"] > 0 and a["gen_ai.usage.output_tokens"] > 0
    assert a["gen_ai.response.finish_reasons"] == ("stop",)
    assert a["gen_ai.request.max_tokens"] == 50 and a["gen_ai.request.temperature"] == 0.5
    assert a["http.response.status_code"] == 200
    assert att.parent is not None and att.parent.span_id == req.context.span_id
    assert att.attributes["gateway.deployment"] == "demo/0"
    assert req.start_time <= att.start_time <= att.end_time <= req.end_time
    # the upstream got our request span as its parent
    headers = {k.lower(): v for k, v in (sent.items() if isinstance(sent, dict) else sent)}
    trace_id = f"{req.context.trace_id:032x}"
    version, tid, sid, flags = headers["traceparent"].split("-")
    assert (version, tid, sid) == ("00", trace_id, f"{req.context.span_id:016x}")
    assert int(flags, 16) & 1  # sampled


def test_client_trace_context_is_continued_not_duplicated() -> None:
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    with running_gateway(tracing=TRACING) as gw:
        r = httpx.post(f"{gw.url}/v1/chat/completions", json=CHAT, timeout=20,
                       headers={"traceparent": parent})  # fmt: skip
        assert r.status_code == 200
        req = next(s for s in spans(gw) if s.kind == SpanKind.SERVER)
        raw = gw.upstream_requests()[0]["headers"]
    assert f"{req.context.trace_id:032x}" == "0af7651916cd43dd8448eb211c80319c"
    assert req.parent is not None and f"{req.parent.span_id:016x}" == "b7ad6b7169203331"
    pairs = raw.items() if isinstance(raw, dict) else raw
    values = [v for k, v in pairs if k.lower() == "traceparent"]
    assert len(values) == 1 and values[0] != parent  # ours (a child), sent once


def test_failed_attempts_get_error_spans() -> None:
    def config(url: str) -> dict[str, Any]:
        dead = demo_model("http://127.0.0.1:9", "demo")["deployments"][0]
        dead["id"], dead["weight"] = "dead", 1e6  # tried first (weighted order)
        live = demo_model(url)["deployments"][0]
        live["weight"] = 1e-6
        return {
            "models": [{"name": "demo", "deployments": [dead, live]}],
            "pipeline": [{"name": "route", "config": {}}],
            "logging": {"request_log": "none"},
            "tracing": TRACING,
        }

    with running_gateway(config) as gw:
        r = httpx.post(f"{gw.url}/v1/chat/completions", json=CHAT, timeout=20)
        assert r.status_code == 200
        got = spans(gw)
    attempts = sorted((s for s in got if s.kind == SpanKind.CLIENT), key=lambda s: s.start_time)
    assert [s.attributes["gateway.deployment"] for s in attempts] == ["dead", "demo/1"]
    assert attempts[0].status.status_code == StatusCode.ERROR
    assert attempts[0].attributes["error.type"] == "upstream_error"
    assert attempts[1].status.status_code != StatusCode.ERROR
    assert attempts[0].end_time <= attempts[1].start_time


def test_error_status_on_refused_request() -> None:
    with running_gateway(tracing=TRACING) as gw:
        r = httpx.post(f"{gw.url}/v1/chat/completions", json={"model": "nope", "messages": []},
                       timeout=20)  # fmt: skip
        assert r.status_code in (400, 404)
        (req,) = spans(gw)
    assert req.status.status_code == StatusCode.ERROR
    assert req.attributes["error.type"] == "invalid_request_error"


def test_off_by_default_nothing_is_created() -> None:
    with running_gateway() as gw:
        assert gw.gateway.tracer is None
        r = httpx.post(f"{gw.url}/v1/chat/completions", json=CHAT, timeout=20)
        assert r.status_code == 200
        sent = gw.upstream_requests()[0]["headers"]
    pairs = sent.items() if isinstance(sent, dict) else sent
    assert not any(k.lower() == "traceparent" for k, _ in pairs)
