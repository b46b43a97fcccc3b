"""Failover end to end in the shapes a deployment fails in before its answer begins: a hang
under a deadline no longer than the first-byte timeout, a stream that opens with an error event,
a role chunk and then nothing, keep-alive comments; and what the breaker and metrics count."""

from __future__ import annotations

import time
from typing import Any

import httpx
import openai
import pytest

from tests.helpers import running_gateway
from tests.plugins.test_route_e2e import (
    MSG,
    TierFromHeader,
    ask_smart,
    models_called,
    one_deployment_then_fallback,
    upstream_errors,
)


def _health(gw: Any, dep_id: str) -> dict[str, Any]:
    return dict(gw.gateway.pipeline.find("route").health()["deployments"][dep_id])


def _short_deadline(deadline_s: float, first_byte_s: float = 10):  # type: ignore[no-untyped-def]
    """The deadline no longer than the upstream's timeout (the shipped defaults: 60/60 for a
    stream's first bytes, 600/600 for a plain answer)."""

    def build(url: str) -> dict[str, Any]:
        route = {"deadline_s": deadline_s, "plain_deadline_s": deadline_s}
        cfg = one_deployment_then_fallback(route)(url)
        cfg["upstream"] = {"first_byte_timeout_s": first_byte_s, "response_timeout_s": first_byte_s}
        return cfg

    return build


@pytest.mark.parametrize("stream", [False, True])
def test_a_hang_is_abandoned_when_the_deadline_is_shorter_than_the_first_byte_timeout(
    stream: bool,
) -> None:
    """The primary hangs; deadline 1.6 s, first-byte timeout 10 s. Streamed, the primary gets
    half the time, then the fallback answers; plain (whose first byte comes with the whole
    answer, so a long answer must not be cut for a fallback), the deadline ends it with a 504.
    Either way the cut counts against the primary, so its breaker opens in time."""
    with running_gateway(
        _short_deadline(1.6),
        registry={"tier": TierFromHeader},
        fake={"behaviours": {"large-up": {"hang_ms": 5000}}},
    ) as gw:
        errors = upstream_errors(gw, "smart-large")
        started = time.perf_counter()
        client = gw.openai()
        if stream:
            resp, text = ask_smart(client, stream)
        else:
            with pytest.raises(openai.APIStatusError) as exc:
                client.chat.completions.create(model="smart", messages=MSG)
            assert exc.value.status_code == 504
            assert 1.5 < time.perf_counter() - started < 3
            assert _health(gw, "smart-large")["consecutive_failures"] == 1
            assert upstream_errors(gw, "smart-large") == errors + 1
            return
        assert 0.7 < time.perf_counter() - started < 1.5
        assert text == "Echo: hello there"
        assert resp.headers["x-gateway-deployment"] == "claude-a"
        assert resp.headers["x-gateway-attempts"] == "2"
        assert models_called(gw) == ["large-up", "claude-up"]
        assert _health(gw, "smart-large")["consecutive_failures"] == 1
        assert upstream_errors(gw, "smart-large") == errors + 1


def test_the_only_deployment_hanging_through_the_deadline_counts_against_it() -> None:
    def build(url: str) -> dict[str, Any]:
        return {
            "models": [{"name": "solo", "deployments": [
                {"id": "solo-a", "model": "solo-up", "base_url": f"{url}/v1"}]}],
            "pipeline": [{"name": "route", "config": {"plain_deadline_s": 0.5}}],
            "upstream": {"response_timeout_s": 10},
            "logging": {"request_log": "none"},
        }  # fmt: skip

    with running_gateway(build, fake={"hang_ms": 5000}) as gw:
        with pytest.raises(openai.APIStatusError) as exc:
            gw.openai().chat.completions.create(model="solo", messages=MSG)
        assert exc.value.status_code == 504
        # It had the request's whole time: a hang, not a request that ran out on others.
        assert _health(gw, "solo-a")["consecutive_failures"] == 1


def metrics_text(gw: Any) -> str:
    return httpx.get(f"{gw.url}/metrics").text


@pytest.mark.parametrize(
    "behaviour",
    [
        {"error_event_after": 0},  # a role chunk, then an error event (vLLM's shape)
        {"drop_after": 0},  # a role chunk, then the connection drops
        {"stall_after": 0},  # a role chunk, then nothing (past the read timeout)
    ],
)
def test_a_stream_failing_before_its_first_content_fails_over(behaviour: dict[str, Any]) -> None:
    """Nothing but a role chunk reached the gateway: nothing reached the client, so the
    fallback answers and the primary is blamed."""

    def build(url: str) -> dict[str, Any]:
        cfg = one_deployment_then_fallback({"deadline_s": 10})(url)
        cfg["upstream"]["read_timeout_s"] = 0.5
        return cfg

    with running_gateway(
        build, registry={"tier": TierFromHeader}, fake={"behaviours": {"large-up": behaviour}}
    ) as gw:
        errors = upstream_errors(gw, "smart-large")
        started = time.perf_counter()
        resp, text = ask_smart(gw.openai(), stream=True)
        assert time.perf_counter() - started < 3
        assert text == "Echo: hello there"
        assert resp.headers["x-gateway-deployment"] == "claude-a"
        assert models_called(gw) == ["large-up", "claude-up"]
        assert _health(gw, "smart-large")["consecutive_failures"] == 1
        assert upstream_errors(gw, "smart-large") == errors + 1


def test_keep_alive_comments_keep_a_thinking_upstream_alive() -> None:
    """Comments (OpenRouter sends them while a reasoning model thinks) are held from the client
    but show the upstream is alive: past the first-byte timeout (0.5 s), each read is bounded
    by the read timeout (1 s), so the primary's answer after 1.5 s of comments is waited for,
    not cut as if the upstream had sent nothing."""

    def build(url: str) -> dict[str, Any]:
        cfg = one_deployment_then_fallback({"deadline_s": 10})(url)
        cfg["upstream"]["read_timeout_s"] = 1
        return cfg

    behaviour = {"keepalive_ms": 100, "hang_ms": 1500}
    with running_gateway(
        build, registry={"tier": TierFromHeader}, fake={"behaviours": {"large-up": behaviour}}
    ) as gw:
        resp, text = ask_smart(gw.openai(), stream=True)
        assert text == "Echo: hello there"
        assert resp.headers["x-gateway-deployment"] == "smart-large"
        assert models_called(gw) == ["large-up"]
        assert _health(gw, "smart-large")["consecutive_failures"] == 0


def test_an_error_event_first_on_the_only_deployment_is_a_502_not_a_stream() -> None:
    def build(url: str) -> dict[str, Any]:
        cfg = one_deployment_then_fallback()(url)
        cfg["models"][0]["fallbacks"] = []
        return cfg

    with running_gateway(
        build,
        registry={"tier": TierFromHeader},
        fake={"behaviours": {"large-up": {"error_event_after": 0}}},
    ) as gw:
        body = {"model": "smart", "messages": MSG, "stream": True}
        with gw.http() as http:
            r = http.post("/v1/chat/completions", json=body)
        assert r.status_code == 502
        assert r.json()["error"]["message"] == (
            "the upstream stream began with an error: injected stream error for model large-up"
        )
