"""Running the gateway: startup failures, exit statuses, the metrics listener, a ledger that is
down. Each case was found by running the real command the way an operator would."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.helpers import ROOT, free_port, running_gateway
from tests.test_usage import ADMIN_KEY, USER_KEY, auth_config

MODEL = {"name": "m", "deployments": [{"model": "x", "base_url": "http://127.0.0.1:1/v1"}]}


def serve(
    tmp_path: Path, config: dict[str, Any], *args: str, timeout: float = 90
) -> tuple[int, str]:
    """``gateway serve`` with ``config`` until it exits (these configs never start)."""
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump(config))
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    r = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "serve", "--config", str(cfg), *args],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout,
    )  # fmt: skip
    return r.returncode, r.stdout + r.stderr


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_startup_failure_exits_3_with_one_line_and_no_traceback(
    tmp_path: Path, workers: str
) -> None:
    """A supervisor (systemd, Kubernetes) must see the failure, and the operator the reason."""
    config = {"models": [MODEL], "logging": {"request_log": str(tmp_path / "no" / "dir.log")}}
    code, out = serve(tmp_path, config, "--port", str(free_port()), "--workers", workers)
    assert code == 3, out
    assert f"logging.request_log: cannot open '{tmp_path}/no/dir.log'" in out
    assert "Traceback" not in out
    # With workers, the folder the workers' metrics went through is gone again.
    assert not list(tmp_path.glob("gateway-metrics-*"))


def test_a_plugin_that_cannot_start_is_one_log_line(tmp_path: Path) -> None:
    auth = {
        **auth_config(),
        "store": {"type": "redis", "url": f"redis://127.0.0.1:{free_port()}/0"},
    }
    config = {"models": [MODEL], "pipeline": [{"name": "auth", "config": auth}]}
    code, out = serve(tmp_path, config, "--port", str(free_port()))
    assert code == 3, out
    assert "startup failed: auth: cannot reach the key store at redis://127.0.0.1:" in out
    assert "Traceback" not in out


@pytest.mark.parametrize(("args", "message"), [
    (["--port", "99999"], "argument --port: port must be 0-65535, not 99999"),
    (["--port", "http"], "argument --port: not a port number: 'http'"),
    (["--workers", "-1"], "argument --workers: must be at least 1, not -1"),
])  # fmt: skip
def test_bad_command_line_numbers_are_refused(
    tmp_path: Path, args: list[str], message: str
) -> None:
    """A port above 65535 used to wrap around silently (99999 listened on 34463)."""
    code, out = serve(tmp_path, {"models": [MODEL]}, *args, timeout=30)
    assert code == 2 and message in out, out


def _raw(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request)
        chunks = []
        while data := s.recv(65536):
            chunks.append(data)
    return b"".join(chunks)


def test_metrics_on_their_own_port(tmp_path: Path) -> None:
    port = free_port()
    metrics = {"port": port, "bearer_token": "scrape-token-CANARY"}
    with running_gateway(metrics=metrics) as gw:
        http = gw.http()
        assert http.post("/v1/chat/completions", json={"model": "demo", "messages": [
            {"role": "user", "content": "hi"}]}).status_code == 200  # fmt: skip
        # Not on the main port any more.
        assert http.get("/metrics").status_code == 404
        url = f"http://127.0.0.1:{port}/metrics"
        r = httpx.get(url, timeout=10)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert httpx.get(url, headers={"authorization": "Bearer wrong"}).status_code == 401
        r = httpx.get(url, headers={"authorization": "Bearer scrape-token-CANARY"}, timeout=10)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        # The scheme is case-insensitive (RFC 9110); "bearer" was a 401.
        lower = httpx.get(url, headers={"authorization": "bearer scrape-token-CANARY"}, timeout=10)
        assert lower.status_code == 200
        # (the process's counters: other tests in this process count too)
        assert (
            'gateway_requests_total{endpoint="chat",model="demo",provider="openai",status="200"} '
            in r.text
        )
        assert "scrape-token-CANARY" not in r.text
        other = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10)
        assert other.status_code == 404 and other.json()["error"]["type"] == "not_found_error"
        assert httpx.post(url, timeout=10).status_code == 405
        # A client that sends garbage or nothing is answered or dropped, and the next works.
        assert _raw(port, b"hello\r\n\r\n").startswith(b"HTTP/1.1 400 ")
        assert _raw(port, b"GET /metrics HTTP/1.1\r\n" + b"x: y\r\n" * 5000) == b""
        head = _raw(
            port, b"HEAD /metrics HTTP/1.1\r\nauthorization: Bearer scrape-token-CANARY\r\n\r\n"
        )
        assert head.startswith(b"HTTP/1.1 200 OK") and head.endswith(b"\r\n\r\n")
        assert (
            httpx.get(url, headers={"authorization": "Bearer scrape-token-CANARY"}).status_code
            == 200
        )


def test_a_metrics_port_in_use_stops_the_startup(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = {"models": [MODEL], "metrics": {"port": port}}
        code, out = serve(tmp_path, config, "--port", str(free_port()))
    assert code == 3, out
    assert f"startup failed: metrics.port: cannot listen on 127.0.0.1:{port}" in out


def test_a_demo_upstream_port_in_use_stops_the_startup(tmp_path: Path) -> None:
    """The start check only connected to the port: any process listening there (a gateway
    left running, a second `make run`) passed it, and requests were proxied to it."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = {"models": [MODEL], "demo_upstream": {"enabled": True, "port": port}}
        code, out = serve(tmp_path, config, "--port", str(free_port()))
    assert code != 0, out
    assert f"demo_upstream.port: 127.0.0.1:{port} is already in use" in out
    assert "Traceback" not in out


def test_a_drain_timeout_under_a_second_is_not_wait_forever() -> None:
    from gateway.cli import graceful_timeout
    from gateway.config import parse_settings

    def timeout(value: float) -> float:
        raw = {"models": [MODEL], "server": {"drain_timeout_s": value}}
        return graceful_timeout(parse_settings(raw, "t.yaml"))

    # int(0.5) or None was None, which uvicorn reads as waiting for ever.
    assert timeout(0.5) == 0.5 and 0 < timeout(0) < 0.01 and timeout(10) == 10


def test_usage_answers_503_while_the_ledger_database_is_down() -> None:
    """An unreachable PostgreSQL was a 500 and two tracebacks per request."""
    down = f"postgresql://postgres@127.0.0.1:{free_port()}/test"
    with running_gateway(
        pipeline=[{"name": "auth", "config": auth_config()}], ledger={"url": down}
    ) as gw:
        for path, key in (("/v1/usage", USER_KEY), ("/admin/usage/summary", ADMIN_KEY),
                          ("/admin/usage/export", ADMIN_KEY)):  # fmt: skip
            r = httpx.get(f"{gw.url}{path}", headers={"authorization": f"Bearer {key}"}, timeout=30)
            assert r.status_code == 503, (path, r.text)
            assert r.json()["error"]["type"] == "service_unavailable"
            assert r.headers["retry-after"] == "5"
        r = httpx.get(f"{gw.url}/v1/usage", params={"format": "xml"},
                      headers={"authorization": f"Bearer {USER_KEY}"}, timeout=30)  # fmt: skip
        assert r.status_code == 400 and r.json()["error"]["param"] == "format"


def test_the_metrics_scrape_token_takes_the_scheme_in_any_case() -> None:
    with running_gateway(metrics={"bearer_token": "scrape-token-CANARY"}) as gw:
        for scheme, status in (("Bearer", 200), ("bearer", 200), ("BEARER", 200), ("Basic", 401)):
            r = gw.http().get(
                "/metrics", headers={"authorization": f"{scheme} scrape-token-CANARY"}
            )
            assert r.status_code == status, scheme
        assert (
            gw.http().get("/metrics", headers={"authorization": "Bearer nope"}).status_code == 401
        )


@pytest.mark.parametrize("key", ["metrics", "demo_upstream"])
def test_a_port_shared_with_the_gateway_is_a_configuration_error(tmp_path: Path, key: str) -> None:
    port = free_port()
    section = {"port": port} if key == "metrics" else {"enabled": True, "port": port}
    code, out = serve(tmp_path, {"models": [MODEL], key: section}, "--port", str(port))
    assert code == 2, out
    assert f"config.yaml: {key}.port: {port} is the port the gateway itself listens on" in out


def test_port_0_still_serves(tmp_path: Path) -> None:
    """metrics.port's default 0 (metrics on the main port) was taken for a clash with
    --port 0 (any free port): the gateway refused to start."""
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump({"models": [MODEL]}))
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "serve", "--config", str(cfg), "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT, env=env, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        seen = ""
        for line in proc.stdout:
            seen += line
            if "Uvicorn running on" in line or "startup complete" in line.lower():
                break
        assert proc.poll() is None, seen
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
