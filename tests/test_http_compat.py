"""HTTP-level drop-in behaviour: what a client that speaks plain HTTP to OpenAI (curl, other
SDKs, proxies in front of the gateway) may send or expect, beyond what the official SDK does."""

from __future__ import annotations

from typing import Any

import pytest

from tests.helpers import running_gateway
from tests.test_proxy import CANARY_CLIENT_KEY, MSG, assert_openai_error

BODY = {"model": "demo", "messages": MSG}


@pytest.fixture(scope="module")
def gw() -> Any:
    with running_gateway(requests={"max_body_bytes": 4096}) as running:
        yield running


@pytest.fixture(autouse=True)
def _clean(gw: Any) -> None:
    gw.upstream.clear()


def test_405_names_the_allowed_methods(gw: Any) -> None:
    # RFC 9110 15.5.6: a 405 must carry Allow; clients and proxies read it.
    h = {"authorization": f"Bearer {CANARY_CLIENT_KEY}"}
    for method in ("GET", "PUT", "DELETE", "OPTIONS"):
        r = gw.http(headers=h).request(method, "/v1/chat/completions")
        assert_openai_error(r, 405)
        assert r.headers["allow"] == "POST"
    r = gw.http(headers=h).post("/v1/models", json={})
    assert_openai_error(r, 405)
    assert set(r.headers["allow"].replace(" ", "").split(",")) == {"GET", "HEAD"}
