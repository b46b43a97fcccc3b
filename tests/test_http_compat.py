"""HTTP-level drop-in behaviour: what a client that speaks plain HTTP to OpenAI (curl, other
SDKs, proxies in front of the gateway) may send or expect, beyond what the official SDK does."""

from __future__ import annotations

import gzip
import json
import zlib
from typing import Any

import pytest

from tests.helpers import running_gateway
from tests.test_proxy import CANARY_CLIENT_KEY, MSG, assert_openai_error, post

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


@pytest.mark.parametrize("coding", ["gzip", "x-gzip", "deflate"])
def test_a_compressed_request_body_is_decoded(gw: Any, coding: str) -> None:
    raw = json.dumps(BODY).encode()
    data = gzip.compress(raw) if "gzip" in coding else zlib.compress(raw)
    r = post(gw, data, **{"content-encoding": coding})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "Echo: hello"
    sent = gw.upstream_requests()[-1]
    assert sent["body"]["messages"] == MSG
    assert "content-encoding" not in {k.lower() for k, _ in sent["headers"]}


def test_gzip_members_one_after_another_are_one_body(gw: Any) -> None:
    raw = json.dumps(BODY).encode()
    data = gzip.compress(raw[:10]) + gzip.compress(raw[10:])
    assert post(gw, data, **{"content-encoding": "gzip"}).status_code == 200


def test_a_compressed_body_is_bounded_once_decoded(gw: Any) -> None:
    # 4 KiB allowed: a body of a few hundred compressed bytes that expands past it is a 413,
    # and the decompression stops there (a small body cannot make the gateway inflate gigabytes).
    big = {"model": "demo", "messages": [{"role": "user", "content": "x" * 1_000_000}]}
    data = gzip.compress(json.dumps(big).encode())
    assert len(data) < 4096
    assert_openai_error(post(gw, data, **{"content-encoding": "gzip"}), 413)
    assert gw.upstream_requests() == []


def test_broken_or_unknown_codings_are_clear_errors(gw: Any) -> None:
    data = gzip.compress(json.dumps(BODY).encode())
    err = assert_openai_error(post(gw, data[:-12], **{"content-encoding": "gzip"}), 400)
    assert "gzip" in err["message"]
    err = assert_openai_error(post(gw, b"\x00not-gzip", **{"content-encoding": "gzip"}), 400)
    assert "gzip" in err["message"]
    r = post(gw, b"\x28\xb5\x2f\xfd compressed", **{"content-encoding": "zstd"})
    err = assert_openai_error(r, 415)
    assert "zstd" in err["message"]
    assert r.headers["accept-encoding"] == "gzip, deflate"
    r = post(gw, data, **{"content-encoding": "gzip, br"})
    assert_openai_error(r, 415)
    assert gw.upstream_requests() == []


def test_a_plain_body_labelled_compressed_is_still_served(gw: Any) -> None:
    # As before compressed bodies were decoded: clients that set the header on a plain body.
    for coding in ("gzip", "br", "identity", "gzip, identity"):
        assert post(gw, BODY, **{"content-encoding": coding}).status_code == 200


def test_a_legacy_function_result_may_have_null_content(gw: Any) -> None:
    # The API reference and the SDK's ChatCompletionFunctionMessageParam: "string or null".
    messages = [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": None, "function_call": {"name": "f", "arguments": "{}"}},
        {"role": "function", "name": "f", "content": None},
    ]
    functions = [{"name": "f", "parameters": {"type": "object", "properties": {}}}]
    r = gw.openai().chat.completions.create(model="demo", messages=messages, functions=functions)
    assert r.choices[0].message.content == "Echo: hello"
    assert gw.upstream_requests()[-1]["body"]["messages"][2] == messages[2]
    # The other roles still need their content.
    for role in ("user", "system", "developer", "tool"):
        msg: dict[str, Any] = {"role": role, "content": None}
        if role == "tool":
            msg["tool_call_id"] = "call_1"
        assert_openai_error(post(gw, {"model": "demo", "messages": [msg]}), 400,
                            param="messages[0].content")  # fmt: skip


@pytest.mark.parametrize(("status", "sent"), [(401, 1), (403, 1), (404, 1), (500, 2)])
def test_the_sdk_does_not_resend_what_only_the_gateways_configuration_can_fix(
    gw: Any, status: int, sent: int
) -> None:
    """An upstream 401/403/404 (the gateway's key or model table is wrong) is a 502 to the
    client, which the openai SDK retries: the upstream got the same request three times.
    ``x-should-retry: false`` stops that; a real upstream failure is still retried."""
    import openai

    client = gw.openai(max_retries=1, default_headers={"x-fake-status": str(status)})
    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(model="demo", messages=MSG)
    assert info.value.status_code == 502
    assert len(gw.upstream_requests()) == sent
    assert (info.value.response.headers.get("x-should-retry") == "false") == (sent == 1)
