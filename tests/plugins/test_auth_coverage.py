"""Every route but the probes refuses an anonymous caller, and says nothing else first."""

from __future__ import annotations

import re
from collections.abc import Iterator

import httpx
import pytest
from starlette.routing import Mount, Route

from gateway.app import PROXIED
from tests.helpers import RunningGateway, running_gateway
from tests.plugins.test_auth_e2e import config

PUBLIC = {"/healthz", "/readyz"}


@pytest.fixture(scope="module")
def gw() -> Iterator[RunningGateway]:
    with running_gateway(config) as running:
        yield running


def all_routes(gw: RunningGateway) -> list[tuple[str, str]]:
    """(method, concrete path) for every route the app serves, path parameters filled in."""
    out: list[tuple[str, str]] = [("POST", p) for p in PROXIED]
    for route in gw.app.app.routes:
        assert isinstance(route, (Route, Mount)), route
        path = re.sub(r"\{[^}]+\}", "x1", route.path)
        for method in sorted(getattr(route, "methods", None) or {"GET"}):
            if method != "HEAD":
                out.append((method, path))
    return out


def test_no_route_redirects_and_no_host_header_reaches_a_location(gw: RunningGateway) -> None:
    for method, path in all_routes(gw):
        for variant in (path + "/", path.rstrip("/")):
            if variant == path:
                continue
            r = httpx.request(method, gw.url + variant, json={},
                              headers={"host": "evil.example"}, follow_redirects=False)  # fmt: skip
            assert r.status_code < 300 or r.status_code >= 400, (method, variant, r.headers)
            assert "location" not in r.headers
            if variant not in PUBLIC:
                assert r.status_code in (401, 404, 405), (method, variant, r.status_code)


def test_the_route_list_is_not_empty_and_includes_admin(gw: RunningGateway) -> None:
    paths = {p for _, p in all_routes(gw)}
    assert {"/v1/chat/completions", "/v1/models", "/metrics", "/healthz"} <= paths
    assert any(p.startswith("/admin/") for p in paths)


def test_every_route_refuses_anonymous_callers(gw: RunningGateway) -> None:
    checked = 0
    for method, path in all_routes(gw):
        r = httpx.request(method, gw.url + path, json={}, headers={"host": "localhost"})
        if path in PUBLIC:
            assert r.status_code in (200, 503), (method, path)
            continue
        assert r.status_code == 401, (method, path, r.status_code, r.text)
        assert r.json()["error"]["type"] == "authentication_error"
        checked += 1
    assert checked >= 8
    assert gw.upstream_requests() == []


@pytest.mark.parametrize(
    ("body", "ctype"),
    [
        (b'{"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]}',
         "application/json"),
        (b"{not json", "application/json"),
        (b"hello", "text/plain"),
        (b"x" * 2_000_000, "application/json"),
    ],
)  # fmt: skip
def test_anonymous_callers_get_401_before_any_body_or_model_error(
    gw: RunningGateway, body: bytes, ctype: str
) -> None:
    r = httpx.post(f"{gw.url}/v1/chat/completions", content=body,
                   headers={"content-type": ctype})  # fmt: skip
    assert r.status_code == 401, r.text
    assert r.json()["error"]["message"] == "invalid credentials"
