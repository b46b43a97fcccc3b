"""End-to-end harness: the real gateway (uvicorn) and the shipped fake upstream, each on a free
loopback port, in background threads with their own event loops.

    with running_gateway(pipeline=[...]) as gw:
        client = gw.openai()                 # official SDK pointed at the gateway
        client.chat.completions.create(...)
        gw.upstream_requests()               # what the fake upstream received

For several gateway processes (replicas, SIGTERM), ``spawn_gateway`` runs ``gateway serve``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import uvicorn
import yaml

from gateway.app import create_app
from gateway.config import parse_settings

ROOT = Path(__file__).resolve().parent.parent


class LoopThread:
    """An asyncio loop in a daemon thread, to host servers while tests call them synchronously."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class FakeUpstream:
    url: str  # http://127.0.0.1:PORT
    thread: LoopThread
    runner: Any

    def requests(self) -> list[dict[str, Any]]:
        return list(httpx.get(f"{self.url}/_fake/requests").json())

    def clear(self) -> None:
        httpx.delete(f"{self.url}/_fake/requests")
        httpx.delete(f"{self.url}/_fake/stats")

    def stats(self) -> dict[str, Any]:
        return dict(httpx.get(f"{self.url}/_fake/stats").json())


@contextlib.contextmanager
def fake_upstream(**kwargs: Any) -> Iterator[FakeUpstream]:
    from gateway.fake_upstream import start

    thread = LoopThread()
    runner, port = thread.run(start("127.0.0.1", 0, **kwargs))
    try:
        yield FakeUpstream(f"http://127.0.0.1:{port}", thread, runner)
    finally:
        thread.run(runner.cleanup())
        thread.stop()


def demo_model(upstream_url: str, name: str = "demo", **deployment: Any) -> dict[str, Any]:
    dep = {
        "provider": "openai",
        "model": f"{name}-upstream",
        "base_url": f"{upstream_url}/v1",
        "api_key": "sk-provider-CANARY-0123456789",
        "price": {"input_per_mtok": 1.0, "output_per_mtok": 2.0},
    }
    dep.update(deployment)
    return {"name": name, "deployments": [dep]}


@dataclass
class RunningGateway:
    url: str  # http://127.0.0.1:PORT
    upstream: FakeUpstream
    app: Any
    server: Any = None
    thread: LoopThread | None = None
    api_key: str = "sk-client-CANARY-abcdef"
    extra: dict[str, Any] = field(default_factory=dict)
    clients: list[Any] = field(default_factory=list)

    @property
    def gateway(self) -> Any:
        return self.app.state.gateway

    def openai(self, api_key: str | None = None, **kwargs: Any) -> Any:
        import openai

        kwargs.setdefault("max_retries", 0)
        kwargs.setdefault("timeout", 20)
        client = openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key or self.api_key, **kwargs)
        self.clients.append(client)
        return client

    def http(self, **kwargs: Any) -> httpx.Client:
        kwargs.setdefault("timeout", 20)
        headers = kwargs.pop("headers", {"authorization": f"Bearer {self.api_key}"})
        client = httpx.Client(base_url=self.url, headers=headers, **kwargs)
        self.clients.append(client)
        return client

    def close_clients(self) -> None:
        for client in self.clients:
            client.close()
        self.clients.clear()

    def upstream_requests(self) -> list[dict[str, Any]]:
        return self.upstream.requests()


def build_config(upstream_url: str, **sections: Any) -> dict[str, Any]:
    config: dict[str, Any] = {"models": [demo_model(upstream_url)], "pipeline": []}
    config["logging"] = {"request_log": "none"}
    config.update({k: v for k, v in sections.items() if v is not None})
    return config


@contextlib.contextmanager
def running_gateway(
    config: dict[str, Any] | Callable[[str], dict[str, Any]] | None = None,
    *,
    registry: dict[str, Any] | None = None,
    fake: dict[str, Any] | None = None,
    env: dict[str, str] | None = None,
    **sections: Any,
) -> Iterator[RunningGateway]:
    """Start the fake upstream (``fake``: its ``create_app`` kwargs) and the gateway.

    ``config`` may be a dict or a callable ``(upstream_url) -> dict``; otherwise ``sections``
    (``pipeline=``, ``models=``, ``upstream=`` ...) are merged into ``build_config``."""
    with fake_upstream(**(fake or {})) as fake_server:
        if callable(config):
            raw = config(fake_server.url)
        elif config is not None:
            raw = config
        else:
            raw = build_config(fake_server.url, **sections)
        settings = parse_settings(raw, "test-config.yaml", env)
        app = create_app(settings, registry)
        uv = uvicorn.Config(
            app, host="127.0.0.1", port=0, loop="asyncio", lifespan="on", log_level="warning",
            access_log=False, timeout_graceful_shutdown=2,
        )  # fmt: skip
        server = uvicorn.Server(uv)
        thread = LoopThread()
        task = asyncio.run_coroutine_threadsafe(server.serve(), thread.loop)
        deadline = time.monotonic() + 30
        while not server.started:
            if task.done():
                task.result()  # raises the startup error
                raise RuntimeError("gateway exited during startup")
            if time.monotonic() > deadline:
                raise RuntimeError("gateway did not start")
            time.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        running = RunningGateway(f"http://127.0.0.1:{port}", fake_server, app, server, thread)
        try:
            yield running
        finally:
            running.close_clients()
            server.should_exit = True
            with contextlib.suppress(Exception):
                task.result(15)
            thread.stop()


@dataclass
class GatewayProcess:
    url: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")


def spawn_gateway(config: dict[str, Any], *, workers: int = 1, env: dict[str, str] | None = None,
                  ready_timeout: float = 60) -> GatewayProcess:  # fmt: skip
    """Run ``gateway serve`` as a real process on a free port and wait for ``/readyz``."""
    tmp = Path(tempfile.mkdtemp(prefix="gw-test-"))
    cfg = tmp / "config.yaml"
    cfg.write_text(yaml.safe_dump(config))
    port = free_port()
    log_path = tmp / "gateway.log"
    full_env = {**os.environ, **(env or {})}
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "serve", "--config", str(cfg), "--port",
             str(port), "--workers", str(workers)],
            stdout=out, stderr=subprocess.STDOUT, env=full_env, cwd=ROOT,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + ready_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gateway exited: {log_path.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return GatewayProcess(url, proc, log_path)
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"gateway not ready: {log_path.read_text()[-3000:]}")


def wait_http_ok(url: str, proc: subprocess.Popen[bytes], what: str, timeout: float = 60) -> None:
    """Poll ``url`` until it answers 200; RuntimeError if ``proc`` exits or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not answer {url} within {timeout:.0f} s")
        time.sleep(0.2)


@contextlib.contextmanager
def chroma_server(path: Path | str) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """``chroma run`` (the Chroma server several replicas share) on a free loopback port, with
    its data in ``path``; yields its URL and process (tests stop and resume it)."""
    port = free_port()
    chroma = Path(sys.executable).parent / "chroma"
    proc = subprocess.Popen(
        [str(chroma), "run", "--path", str(path), "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http_ok(f"{url}/api/v2/heartbeat", proc, "chroma server")
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)  # in case a test left it stopped
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def tokenized_texts(monkeypatch: Any) -> list[str]:
    """Record every text the tokenizer counts from now on (it still counts them)."""
    from gateway import tokens

    calls: list[str] = []
    real = tokens.encoded_len

    def counting(enc: Any, text: str) -> int:
        calls.append(text)
        return real(enc, text)

    monkeypatch.setattr(tokens, "encoded_len", counting)
    return calls
