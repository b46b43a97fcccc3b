"""The core request path end to end: SDK compatibility, error classes, request hygiene."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import openai
import pytest

from gateway.errors import UnprocessableEntityError
from gateway.plugin import Plugin, PluginConfig
from tests.helpers import running_gateway

CANARY_CLIENT_KEY = "sk-client-CANARY-abcdef"
MSG = [{"role": "user", "content": "hello"}]


def post(gw: Any, body: Any, **headers: str) -> httpx.Response:
    h = {"authorization": f"Bearer {CANARY_CLIENT_KEY}", "content-type": "application/json"}
    h.update(headers)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{gw.url}/v1/chat/completions", content=data, headers=h, timeout=20)


def assert_openai_error(r: httpx.Response, status: int, code: str | None = None,
                        param: str | None = None) -> dict[str, Any]:  # fmt: skip
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert r.headers.get("x-request-id")
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert "Traceback" not in err["message"]
    if code is not None:
        assert err["code"] == code
    if param is not None:
        assert err["param"] == param
    return dict(err)


@pytest.fixture(scope="module")
def gw() -> Any:
    with running_gateway(requests={"max_body_bytes": 4096, "max_tokens": 1000, "max_n": 2},
                         fake={"chunks": 3}) as running:  # fmt: skip
        yield running


@pytest.fixture(autouse=True)
def _clean(gw: Any) -> None:
    gw.upstream.clear()


def test_sdk_plain_completion(gw: Any) -> None:
    r = gw.openai().chat.completions.create(model="demo", messages=MSG)
    assert r.choices[0].message.content == "Echo: hello"
    assert r.usage is not None and r.usage.total_tokens > 0
    sent = gw.upstream_requests()[-1]
    assert sent["body"]["model"] == "demo-upstream"  # public name rewritten to the deployment's


def test_current_sdk_parameters_reach_the_upstream(gw: Any) -> None:
    # Added to the API and the SDK in 2026; an allow-list that lags behind the SDK turns them
    # into 400 unknown_parameter for every team that upgrades its client.
    fields: dict[str, Any] = {
        "prompt_cache_options": {"mode": "explicit", "ttl": "30m"},
        "prompt_cache_retention": "24h",
        "moderation": {"enabled": True},
        "verbosity": "low",
        "safety_identifier": "user-hash-1",
    }
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "hello", "prompt_cache_breakpoint": {"mode": "explicit"}}
            ],
        }
    ]
    r = gw.openai().chat.completions.create(
        model="demo", messages=messages, extra_body=fields
    )  # fmt: skip
    assert r.choices[0].message.content == "Echo: hello"
    sent = gw.upstream_requests()[-1]["body"]
    assert {k: sent.get(k) for k in fields} == fields
    assert sent["messages"] == messages


def test_sdk_streamed_completion(gw: Any) -> None:
    stream = gw.openai().chat.completions.create(model="demo", messages=MSG, stream=True)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Echo: hello"
    # The gateway asks the upstream for usage but the client did not: no usage chunk leaks.
    assert all(c.choices for c in chunks)
    assert gw.upstream_requests()[-1]["body"]["stream_options"] == {"include_usage": True}


def test_sdk_stream_with_usage_when_asked(gw: Any) -> None:
    stream = gw.openai().chat.completions.create(
        model="demo", messages=MSG, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens > 0


def test_model_alias_and_models_listing(gw: Any) -> None:
    models = gw.openai().models.list()
    assert [m.id for m in models.data] == ["demo"]


def test_sdk_retrieves_one_model(gw: Any) -> None:
    m = gw.openai().models.retrieve("demo")
    assert (m.id, m.object, m.owned_by) == ("demo", "model", "gateway")
    with pytest.raises(openai.NotFoundError) as info:
        gw.openai().models.retrieve("no-such-model")
    assert info.value.code == "model_not_found"
    r = httpx.get(f"{gw.url}/v1/models/no-such-model", timeout=20)
    assert_openai_error(r, 404, "model_not_found", "model")
    assert httpx.get(f"{gw.url}/models/demo", timeout=20).json()["id"] == "demo"
    # Only GET: the OpenAI API's DELETE (fine-tuned models) is not the gateway's to offer.
    assert_openai_error(httpx.delete(f"{gw.url}/v1/models/demo", timeout=20), 405)
    assert gw.upstream_requests() == []


def test_models_with_slashes_in_their_names_and_aliases_are_retrieved() -> None:
    name = "meta-llama/Llama-3.1-8B-Instruct"
    with running_gateway(config=lambda url: {
        "models": [{"name": name, "aliases": ["llama"], "deployments": [
            {"model": "up", "base_url": f"{url}/v1"}]}],
        "logging": {"request_log": "none"},
    }) as g:  # fmt: skip
        client = g.openai()
        assert client.models.retrieve(name).id == name
        assert client.models.retrieve("llama").id == "llama"  # as asked: a usable name
        assert [m.id for m in client.models.list()] == [name, "llama"]
        r = httpx.get(f"{g.url}/v1/models/meta-llama%2FLlama-3.1-8B-Instruct", timeout=20)
        assert r.status_code == 200 and r.json()["id"] == name
        with pytest.raises(openai.NotFoundError):
            client.models.retrieve("meta-llama")


def test_embeddings_go_through_the_gateway(gw: Any) -> None:
    with running_gateway(config=lambda url: {
        "models": [{"name": "emb", "kind": "embeddings", "deployments": [
            {"model": "e-up", "base_url": f"{url}/v1"}]}],
        "logging": {"request_log": "none"},
    }) as g:  # fmt: skip
        r = g.openai().embeddings.create(model="emb", input=["a", "b"])
        assert len(r.data) == 2 and len(r.data[0].embedding) > 0
        assert g.upstream_requests()[-1]["body"]["input"] == ["a", "b"]
        with pytest.raises(openai.NotFoundError):  # a chat call to an embeddings model
            g.openai().chat.completions.create(model="emb", messages=MSG)
        # Token ids (0 included) and lists of them are inputs too.
        for tokens in ([0, 15, 27], [[0, 1], [2]]):
            g.openai().embeddings.create(model="emb", input=tokens)
            assert g.upstream_requests()[-1]["body"]["input"] == tokens
        g.upstream.clear()
        for bad in ("", [], [""], ["a", ""], [[]], [[1], []], [True], [[1, True]], [1, "a"], 5,
                    [-1, -2], [10**12], [[0, 2**31]]):  # fmt: skip
            r = httpx.post(f"{g.url}/v1/embeddings", json={"model": "emb", "input": bad},
                           timeout=20)  # fmt: skip
            assert_openai_error(r, 400, param="input")
        r = httpx.post(f"{g.url}/v1/embeddings", json={"model": "emb", "input": "x", "user": 5},
                       timeout=20)  # fmt: skip
        assert_openai_error(r, 400, param="user")
        assert g.upstream_requests() == []


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "demo"}, "messages"),
        ({"model": "demo", "messages": []}, "messages"),
        ({"messages": MSG}, "model"),
        ({"model": "demo", "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"model": "demo", "messages": [{"role": ["user"], "content": "x"}]}, "messages[0].role"),
        ({"model": "demo", "messages": [{"role": "user", "content": [{"type": {}}]}]},
         "messages[0].content[0].type"),
        ({"model": "demo", "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"model": "demo", "messages": [{"role": "user", "content": [{"type": "video"}]}]},
         "messages[0].content[0].type"),
        ({"model": "demo", "messages": MSG, "temperature": 5}, "temperature"),
        ({"model": "demo", "messages": MSG, "max_tokens": 5000}, "max_tokens"),
        ({"model": "demo", "messages": MSG, "n": 3}, "n"),
        ({"model": "demo", "messages": MSG, "stream": "yes"}, "stream"),
        ({"model": "demo", "messages": MSG, "frobnicate": 1}, "frobnicate"),
        # Two-key messages are checked on a fast path: a tool answer still needs its id.
        ({"model": "demo", "messages": [{"role": "tool", "content": "x"}]},
         "messages[0].tool_call_id"),
        ({"model": "demo", "messages": [*MSG, {"role": "user", "content": "x", "name": 5}]},
         "messages[1].name"),
        ({"model": "demo", "messages": [{"role": "user", "content": None}]},
         "messages[0].content"),
        ({"model": "demo", "messages": MSG, "top_p": 3}, "top_p"),
        ({"model": "demo", "messages": MSG, "seed": 2**64}, "seed"),
        # Went upstream unchecked (a bad-input probe):
        ({"model": "demo", "messages": MSG, "logit_bias": {"abc": 1}}, "logit_bias"),
        ({"model": "demo", "messages": MSG, "logit_bias": {"50256": "x"}}, "logit_bias"),
        ({"model": "demo", "messages": MSG, "logit_bias": {"50256": 101}}, "logit_bias"),
        ({"model": "demo", "messages": MSG, "stream": True,
          "stream_options": {"include_usage": "yes"}}, "stream_options"),
        # Replayed tool calls: a function call needs its function, a custom one its custom.
        ({"model": "demo", "messages": [*MSG, {"role": "assistant", "tool_calls": [
            {"id": "c1", "type": "function"}]}]}, "messages[1].tool_calls[0]"),
        ({"model": "demo", "messages": [*MSG, {"role": "assistant", "tool_calls": [
            {"id": "c1", "type": "custom", "function": {"name": "f", "arguments": "{}"}}]}]},
         "messages[1].tool_calls[0].custom"),
        ({"model": "demo", "messages": [*MSG, {"role": "assistant", "tool_calls": [
            {"id": "c1", "type": "custom", "custom": {"name": "f", "input": {"a": 1}}}]}]},
         "messages[1].tool_calls[0].custom"),
        ({"model": "demo", "messages": [*MSG, {"role": "assistant", "tool_calls": [
            {"id": "c1", "type": "custom", "custom": {"input": "x"}}]}]},
         "messages[1].tool_calls[0].custom"),
    ],
)  # fmt: skip
def test_schema_errors_are_400_naming_the_param(gw: Any, body: dict[str, Any], param: str) -> None:
    r = post(gw, body)
    assert_openai_error(r, 400, param=param)
    assert gw.upstream_requests() == []


CUSTOM_CALL = {"id": "c1", "type": "custom",
               "custom": {"name": "code_exec", "input": "print(1)"}}  # fmt: skip
CUSTOM_HISTORY = [
    {"role": "user", "content": "run it"},
    {"role": "assistant", "content": None, "tool_calls": [CUSTOM_CALL]},
    {"role": "tool", "tool_call_id": "c1", "content": "1"},
    {"role": "user", "content": "hello"},
]


@pytest.mark.parametrize("stream", [False, True])
def test_a_replayed_custom_tool_call_is_accepted_and_forwarded(stream: bool) -> None:
    """OpenAI and its SDK take a custom tool's call in the history (it was a 400 'malformed');
    the guard's slots and the token estimate (no usage from the upstream) read it too."""
    guard = {"name": "guard", "config": {"semantic": {"enabled": False}}}
    tools = [{"type": "custom", "custom": {"name": "code_exec", "description": "Run Python"}}]
    with running_gateway(pipeline=[guard], fake={"no_usage": True}) as g:
        client = g.openai()
        if stream:
            chunks = list(client.chat.completions.create(
                model="demo", messages=CUSTOM_HISTORY, tools=tools, stream=True,  # type: ignore
                stream_options={"include_usage": True},
            ))  # fmt: skip
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        else:
            r = client.chat.completions.create(
                model="demo",
                messages=CUSTOM_HISTORY,
                tools=tools,  # type: ignore[arg-type]
            )
            text = r.choices[0].message.content or ""
        assert text == "Echo: hello"
        # The upstream sent no usage: the gateway counted the prompt itself (once the request
        # is accounted, which may follow the last byte by a moment).
        deadline = time.monotonic() + 5
        while True:
            metrics = httpx.get(f"{g.url}/metrics", timeout=20).text
            prefix = 'gateway_tokens_total{model="demo",type="prompt"}'
            lines = [ln for ln in metrics.splitlines() if ln.startswith(prefix)]
            if (lines and float(lines[0].split()[-1]) > 0) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert lines and float(lines[0].split()[-1]) > 0
        sent = g.upstream_requests()[-1]["body"]
        assert sent["messages"][1]["tool_calls"] == [CUSTOM_CALL]
        assert sent["tools"] == tools


@pytest.mark.parametrize(
    "field", ["api_base", "base_url", "api_key", "extra_headers", "headers", "organization"]
)
def test_redirecting_fields_are_refused_not_forwarded(gw: Any, field: str) -> None:
    body = {"model": "demo", "messages": MSG, field: "http://evil.example/v1"}
    r = post(gw, body)
    assert_openai_error(r, 400, code="forbidden_parameter", param=field)
    assert gw.upstream_requests() == []


def test_sdk_gets_the_right_exception_classes(gw: Any) -> None:
    client = gw.openai()
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="demo", messages=[])
    with pytest.raises(openai.NotFoundError) as nf:
        client.chat.completions.create(model="no-such-model", messages=MSG)
    assert nf.value.body["code"] == "model_not_found"  # type: ignore[index]
    assert gw.upstream_requests() == []


@pytest.mark.parametrize(
    ("status", "exc", "code"),
    [
        (500, openai.InternalServerError, 502),
        (503, openai.InternalServerError, 503),
        (429, openai.RateLimitError, 429),
        (401, openai.InternalServerError, 502),  # the gateway's key is wrong, not the client's
        (400, openai.BadRequestError, 400),
    ],
)
def test_upstream_errors_map_to_sdk_exceptions(gw: Any, status: int, exc: type, code: int) -> None:
    client = gw.openai(default_headers={"x-fake-status": str(status), "x-fake-retry-after": "7"})
    with pytest.raises(exc) as info:
        client.chat.completions.create(model="demo", messages=MSG)
    assert info.value.status_code == code
    if status == 429:
        assert info.value.response.headers["retry-after"] == "7"
    assert "CANARY" not in info.value.response.text


@pytest.mark.parametrize("stream", [False, True])
def test_upstream_request_errors_keep_their_code_and_param(gw: Any, stream: bool) -> None:
    # What clients test for (LangChain and others: a context-length error means "trim the
    # history"), as OpenAI sends it; the gateway's own wording must not replace it.
    client = gw.openai(default_headers={
        "x-fake-status": "400", "x-fake-error-code": "context_length_exceeded",
        "x-fake-error-param": "messages"})  # fmt: skip
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="demo", messages=MSG, stream=stream)
    assert (info.value.code, info.value.param) == ("context_length_exceeded", "messages")
    assert "injected failure 400" in info.value.message
    # Anything but an identifier or a field path is not passed on.
    client = gw.openai(default_headers={
        "x-fake-status": "400", "x-fake-error-code": "not an identifier",
        "x-fake-error-param": "x" * 101})  # fmt: skip
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="demo", messages=MSG, stream=stream)
    assert (info.value.code, info.value.param) == ("invalid_request", None)


def test_upstream_hang_before_first_byte_is_504() -> None:
    upstream = {"first_byte_timeout_s": 0.3, "response_timeout_s": 0.3}  # streamed, plain
    with running_gateway(fake={"hang_ms": 3000}, upstream=upstream) as gw:
        with pytest.raises(openai.APIStatusError) as info:
            gw.openai().chat.completions.create(model="demo", messages=MSG)
        assert info.value.status_code == 504
        with pytest.raises(openai.APIStatusError) as info:
            gw.openai().chat.completions.create(model="demo", messages=MSG, stream=True)
        assert info.value.status_code == 504


def test_upstream_refusing_connections_is_502() -> None:
    from tests.helpers import demo_model, free_port

    dead = f"http://127.0.0.1:{free_port()}"
    with running_gateway(models=[demo_model(dead)]) as gw:
        with pytest.raises(openai.InternalServerError) as info:
            gw.openai().chat.completions.create(model="demo", messages=MSG)
        assert info.value.status_code == 502


class Unprocessable(Plugin):
    name = "unprocessable"
    Config = PluginConfig

    async def on_request(self, ctx: Any) -> None:
        raise UnprocessableEntityError("cannot process this")


def test_422_from_a_plugin_reaches_the_sdk() -> None:
    with running_gateway(registry={"u": Unprocessable}, pipeline=[{"name": "u"}]) as gw:
        with pytest.raises(openai.UnprocessableEntityError):
            gw.openai().chat.completions.create(model="demo", messages=MSG)


def test_invalid_json_is_400(gw: Any) -> None:
    assert_openai_error(post(gw, b"{not json"), 400)
    assert_openai_error(post(gw, b"[1, 2]"), 400)


@pytest.mark.parametrize("field", ["metadata", "response_format", "tools"])
def test_a_body_nested_too_deep_to_forward_is_400(gw: Any, field: str) -> None:
    """orjson parses 1,024 levels but writes only ~254: a body 300 deep was parsed, then every
    later dumps (the upstream request, the token count, the cache key) failed: a 500."""
    deep = b"[" * 300 + b"]" * 300
    body = b'{"model":"demo","messages":[{"role":"user","content":"hi"}],"' + field.encode()
    r = post(gw, body + b'":{"a":' + deep + b"}}")
    assert_openai_error(r, 400)
    assert "nests deeper" in r.json()["error"]["message"]
    assert gw.upstream_requests() == []
    # Brackets in strings or a long flat list are no nesting.
    flat = {"model": "demo", "messages": [{"role": "user", "content": "[[[" * 200}],
            "metadata": {"k": "{" * 300}, "stop": ["]"] * 4}  # fmt: skip
    assert post(gw, flat).status_code == 200


def test_a_body_that_stops_midway_is_408_within_the_body_timeout() -> None:
    """The body was read with no deadline: a client sending 9 of its 100 bytes held the
    connection and an in-flight slot until it left (max_parallel never saw it)."""
    import socket

    with running_gateway(requests={"body_timeout_s": 0.5}) as g:
        host, port = g.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
                b'{"model":'
            )
            start = time.monotonic()
            head = b""
            while b"request_timeout" not in head and time.monotonic() - start < 5:
                piece = s.recv(65536)
                if not piece:
                    break
                head += piece
            assert time.monotonic() - start < 5
        assert head.startswith(b"HTTP/1.1 408")
        assert b'"code":"request_timeout"' in head
        # A body that arrives in time is served as always.
        assert post(g, {"model": "demo", "messages": MSG}).status_code == 200


def test_non_json_content_type_is_415(gw: Any) -> None:
    r = post(gw, {"model": "demo", "messages": MSG}, **{"content-type": "text/plain"})
    assert_openai_error(r, 415)
    assert gw.upstream_requests() == []


def test_body_over_the_limit_is_413_before_parsing(gw: Any) -> None:
    big = {"model": "demo", "messages": [{"role": "user", "content": "x" * 10_000}]}
    assert_openai_error(post(gw, big), 413)

    # Also when the client lies about (or omits) the length: chunked upload.
    def gen() -> Any:
        for _ in range(10):
            yield b"x" * 1000

    r = httpx.post(f"{gw.url}/v1/chat/completions", content=gen(),
                   headers={"content-type": "application/json"})  # fmt: skip
    assert_openai_error(r, 413)
    assert gw.upstream_requests() == []


def test_wrong_method_and_unknown_route_are_openai_shaped(gw: Any) -> None:
    r = httpx.get(f"{gw.url}/v1/chat/completions")
    assert_openai_error(r, 405)
    r = httpx.get(f"{gw.url}/v1/nothing-here")
    assert_openai_error(r, 404)


def test_client_credentials_and_hop_by_hop_headers_never_reach_upstream(gw: Any) -> None:
    r = post(
        gw,
        {"model": "demo", "messages": MSG},
        **{
            "x-api-key": "xkey-CANARY",
            "cookie": "session=CANARY",
            "proxy-authorization": "Basic CANARY",
            "connection": "keep-alive, x-secret-hop",
            "x-secret-hop": "CANARY",
            "te": "trailers",
            "x-forwarded-for": "6.6.6.6",
            "openai-organization": "org-CANARY",
            "x-real-ip": "CANARY",
            "x-http-method-override": "DELETE-CANARY",
            "x-original-url": "/admin-CANARY",
            "x-custom-trace": "kept",
        },
    )
    assert r.status_code == 200, r.text
    sent = gw.upstream_requests()[-1]
    names = {k.lower(): v for k, v in sent["headers"]}
    flat = json.dumps(sent["headers"])
    assert "CANARY" not in flat.replace("sk-provider-CANARY-0123456789", "")
    assert names["authorization"] == "Bearer sk-provider-CANARY-0123456789"
    assert "x-secret-hop" not in names and "te" not in names and "cookie" not in names
    assert "x-forwarded-for" not in names
    assert names["x-custom-trace"] == "kept"


def test_the_clients_content_encoding_is_not_forwarded(gw: Any) -> None:
    # The upstream gets the gateway's own serialisation of the body, never encoded: forwarding
    # the client's header made the upstream fail with a 5xx, and five of those opened the
    # deployment's circuit breaker for every caller.
    for _ in range(8):
        r = post(gw, {"model": "demo", "messages": MSG}, **{"content-encoding": "gzip"})
        assert r.status_code == 200, r.text
        names = {k.lower() for k, _ in gw.upstream_requests()[-1]["headers"]}
        assert "content-encoding" not in names
    # A body that really is compressed is decoded (tests/test_http_compat.py); the upstream
    # gets it plain, without the header.
    import gzip

    gw.upstream.clear()
    body = gzip.compress(json.dumps({"model": "demo", "messages": MSG}).encode())
    assert post(gw, body, **{"content-encoding": "gzip"}).status_code == 200
    names = {k.lower() for k, _ in gw.upstream_requests()[-1]["headers"]}
    assert "content-encoding" not in names


def test_request_id_is_accepted_or_generated_on_every_response(gw: Any) -> None:
    r = post(gw, {"model": "demo", "messages": MSG}, **{"x-request-id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    assert dict(gw.upstream_requests()[-1]["headers"])["X-Request-ID"] == "abc-123"
    r = post(gw, {"model": "demo", "messages": MSG}, **{"x-request-id": "bad id <script>"})
    assert r.headers["x-request-id"] != "bad id" and len(r.headers["x-request-id"]) == 24
    r = post(gw, {"model": "nope", "messages": MSG})
    assert r.status_code == 404 and r.headers["x-request-id"]


def test_health_readiness_and_metrics(gw: Any) -> None:
    assert httpx.get(f"{gw.url}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{gw.url}/readyz").status_code == 200
    gw.openai().chat.completions.create(model="demo", messages=MSG)
    text = httpx.get(f"{gw.url}/metrics").text
    series = 'gateway_requests_total{endpoint="chat",model="demo",provider="openai",status="200"}'
    assert series in text
    assert "gateway_request_duration_seconds_bucket" in text
    assert "CANARY" not in text


def test_invented_model_names_do_not_create_metric_series(gw: Any) -> None:
    for i in range(3):
        post(gw, {"model": f"invented-{i}", "messages": MSG})
    text = httpx.get(f"{gw.url}/metrics").text
    assert "invented-" not in text
