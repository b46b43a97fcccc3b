"""SIGTERM: /readyz turns 503 while requests are still served, the in-flight stream finishes,
the request log is flushed, and the process exits 0."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers import demo_model, fake_upstream, spawn_gateway


def start_stream(url: str, result: dict[str, Any]) -> threading.Thread:
    """A streamed request in a thread; its status and text (or the error) land in ``result``."""

    def stream() -> None:
        body = {"model": "demo", "stream": True,
                "messages": [{"role": "user", "content": "a long answer"}]}  # fmt: skip
        try:
            r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=20)
            result["status"], result["text"] = r.status_code, r.text
        except httpx.HTTPError as e:  # the connection is closed mid-body
            result["error"] = repr(e)

    t = threading.Thread(target=stream)
    t.start()
    return t


def config_for(upstream: str, log_file: Path, **server: Any) -> dict[str, Any]:
    return {
        "models": [demo_model(upstream)],
        "server": server,
        "logging": {"request_log": str(log_file)},
    }


def test_sigterm_drains_then_exits_zero(tmp_path: Path) -> None:
    log_file = tmp_path / "requests.jsonl"
    with fake_upstream(chunks=10, delay_ms=150) as fake:
        gw = spawn_gateway(config_for(fake.url, log_file, drain_delay_s=1.0, drain_timeout_s=10))
        result: dict[str, Any] = {}
        t = start_stream(gw.url, result)
        time.sleep(0.4)  # the stream is under way (1.5 s long)
        gw.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        ready = httpx.get(f"{gw.url}/readyz", timeout=5)
        assert ready.status_code == 503
        assert ready.json() == {"status": "draining"}
        # still serving during the drain delay
        r = httpx.post(
            f"{gw.url}/v1/chat/completions",
            timeout=5,
            json={"model": "demo", "messages": [{"role": "user", "content": "hi"}]},
        )
        assert r.status_code == 200
        t.join(20)
        code = gw.proc.wait(20)
        assert code == 0, gw.output()[-2000:]
        assert result["status"] == 200 and result["text"].endswith("data: [DONE]\n\n")
        lines = [json.loads(x) for x in log_file.read_text().splitlines()]
        assert len(lines) == 2
        assert {line["stream"] for line in lines} == {True, False}
        assert all(line["status"] == 200 for line in lines)


def test_a_stream_cut_by_the_drain_timeout_is_logged_as_cancelled(tmp_path: Path) -> None:
    """The drain timeout ends a stream still running: the request is logged (before the log
    closes) as cancelled, not as a success a cache or a report would take for a whole answer."""
    log_file = tmp_path / "requests.jsonl"
    with fake_upstream(chunks=10, delay_ms=400) as fake:  # a 4 s answer
        gw = spawn_gateway(config_for(fake.url, log_file, drain_delay_s=0, drain_timeout_s=1))
        result: dict[str, Any] = {}
        t = start_stream(gw.url, result)
        time.sleep(0.6)
        gw.proc.send_signal(signal.SIGTERM)
        t.join(20)
        assert gw.proc.wait(20) == 0, gw.output()[-2000:]
        text = result.get("text", "")
        assert not text.endswith("data: [DONE]\n\n")
        # The stream ends with an OpenAI error event saying why, not a bare cut.
        last = json.loads(text.strip().split("\n\n")[-1].removeprefix("data: "))
        assert last["error"]["type"] == "service_unavailable", text[-500:]
        lines = [json.loads(x) for x in log_file.read_text().splitlines()]
        assert len(lines) == 1, gw.output()[-2000:]
        assert lines[0]["error_type"] == "cancelled" and lines[0]["stream"] is True
        assert "Exception in ASGI application" not in gw.output()


def test_a_plain_request_cut_by_the_drain_timeout_gets_an_openai_503(tmp_path: Path) -> None:
    """The upstream has not answered when the drain timeout passes: the client gets an
    OpenAI-shaped 503 with its request id (not uvicorn's text/plain 500), and the log says 503."""
    log_file = tmp_path / "requests.jsonl"
    with fake_upstream(hang_ms=15000) as fake:
        gw = spawn_gateway(config_for(fake.url, log_file, drain_delay_s=0, drain_timeout_s=1))
        result: dict[str, Any] = {}

        def plain() -> None:
            body = {"model": "demo", "messages": [{"role": "user", "content": "hi"}]}
            r = httpx.post(f"{gw.url}/v1/chat/completions", json=body, timeout=20)
            result.update(status=r.status_code, body=r.json(), headers=r.headers)

        t = threading.Thread(target=plain)
        t.start()
        time.sleep(0.6)
        gw.proc.send_signal(signal.SIGTERM)
        t.join(20)
        assert gw.proc.wait(20) == 0, gw.output()[-2000:]
        assert result["status"] == 503, result
        assert result["body"]["error"]["type"] == "service_unavailable"
        assert result["headers"]["retry-after"] == "1" and result["headers"]["x-request-id"]
        lines = [json.loads(x) for x in log_file.read_text().splitlines()]
        assert len(lines) == 1, gw.output()[-2000:]
        assert lines[0]["status"] == 503 and lines[0]["error_type"] == "cancelled"
        assert "Exception in ASGI application" not in gw.output()


@pytest.mark.anyio
async def test_a_cancel_during_a_plain_answers_response_phase_still_answers_503() -> None:
    """Shutdown may cancel a request while a plugin's response hook runs, before the answer
    went out: the client gets the OpenAI 503 (not uvicorn's text/plain 500 for an app that
    sent nothing), and the hooks of the plugins below still run."""
    from gateway import fake_upstream as fake
    from gateway.app import create_app
    from gateway.config import parse_settings
    from gateway.plugin import Plugin, PluginConfig
    from tests.helpers import build_config

    entered = asyncio.Event()
    settled: list[str] = []

    class Settles(Plugin):
        name = "settles"
        Config = PluginConfig

        async def on_response(self, ctx: Any) -> None:
            settled.append(ctx.request_id)

    class Slow(Plugin):
        name = "slow"
        Config = PluginConfig

        async def on_response(self, ctx: Any) -> None:
            entered.set()  # as a Redis write or a scan in a thread would, it waits
            await asyncio.sleep(30)

    runner, port = await fake.start()
    try:
        raw = build_config(f"http://127.0.0.1:{port}",
                           pipeline=[{"name": "settles"}, {"name": "slow"}])  # fmt: skip
        app = create_app(parse_settings(raw, "t.yaml", {}), {"settles": Settles, "slow": Slow})
        await app.gateway.startup()
        body = json.dumps({"model": "demo", "messages": [{"role": "user", "content": "hi"}]})
        sent: list[dict[str, Any]] = []
        done = asyncio.Event()

        async def receive() -> dict[str, Any]:
            if not done.is_set():
                done.set()
                return {"type": "http.request", "body": body.encode(), "more_body": False}
            await asyncio.sleep(60)
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
                 "method": "POST", "path": "/v1/chat/completions", "raw_path": b"",
                 "query_string": b"", "root_path": "", "scheme": "http",
                 "headers": [(b"content-type", b"application/json")],
                 "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2)}  # fmt: skip
        task = asyncio.ensure_future(app(scope, receive, send))
        await asyncio.wait_for(entered.wait(), 10)
        task.cancel()
        await asyncio.wait_for(task, 10)  # the handler answers; the cancellation ends there
        assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 503
        assert json.loads(sent[1]["body"])["error"]["type"] == "service_unavailable"
        assert len(settled) == 1  # the plugin below the cancelled one still settled
        await app.gateway.shutdown()
    finally:
        await runner.cleanup()
