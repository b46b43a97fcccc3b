"""Property-based fuzzing of a running gateway (real uvicorn, the fake upstream, auth with valid
keys so the body parser and validator are reached).

Properties, for every route and any body, method and headers Hypothesis generates:

* the gateway never answers 500 (or anything outside 200-599) and never hangs (client timeout);
* nothing invalid is ever forwarded: every body the fake upstream recorded is a well-formed
  chat or embeddings request (checked here independently of ``gateway/validate.py``).
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
import redis
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st

from gateway.validate import CHAT_FIELDS, EMBEDDING_FIELDS, FORBIDDEN

from .helpers import RunningGateway, demo_model, running_gateway
from .plugins.test_auth_support import ADMIN_KEY, USER_KEY, base_config

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/13")
FUZZ = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
ROUTES = [
    "/v1/chat/completions", "/chat/completions", "/v1/embeddings", "/embeddings", "/v1/models",
    "/models", "/healthz", "/readyz", "/metrics", "/admin/keys", "/admin/keys/some-id",
]  # fmt: skip
ROLES = {"system", "developer", "user", "assistant", "tool", "function"}


@pytest.fixture(scope="module")
def gw() -> Iterator[RunningGateway]:
    prefix = f"gwfuzz:{secrets.token_hex(6)}:"
    auth = base_config(store={"type": "redis", "url": REDIS_URL, "prefix": prefix})

    def config(upstream: str) -> dict[str, Any]:
        return {
            "models": [
                demo_model(upstream),
                {**demo_model(upstream, "embed-small"), "kind": "embeddings"},
            ],
            "pipeline": [
                {"name": "auth", "config": auth},
                {"name": "limit", "config": {"rules": [{"scope": "user", "tpm": 10**9}]}},
                {"name": "cache", "config": {}},
                {"name": "headers", "config": {"response": {"x-fuzz": "1"}}},
            ],
            "logging": {"request_log": "none"},
        }

    with running_gateway(config, fake={"record": 100_000}) as running:
        running.api_key = USER_KEY
        yield running
    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(match=f"{prefix}*"))
    if keys:
        client.delete(*keys)
    client.close()


# --- strategies ---------------------------------------------------------------------------------

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False),
    st.text(max_size=40),
)  # fmt: skip
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=12,
)
field_names = st.sampled_from(sorted(CHAT_FIELDS | EMBEDDING_FIELDS | FORBIDDEN | {"rag"}))
messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from([*sorted(ROLES), "root", ""]) | json_values},
        optional={
            "content": st.text(max_size=30) | json_values
            | st.lists(st.fixed_dictionaries({"type": st.sampled_from(
                ["text", "image_url", "refusal", "bogus"]), "text": st.text(max_size=10)}),
                max_size=3),
            "tool_calls": json_values, "tool_call_id": json_values, "name": json_values,
        },
    ),
    max_size=4,
)  # fmt: skip
chat_like = st.fixed_dictionaries(
    {"model": st.sampled_from(["demo", "embed-small", "nope", ""]) | json_values},
    optional={"messages": messages | json_values, "input": json_values | st.text(max_size=20)},
).flatmap(
    lambda base: st.dictionaries(field_names, json_values, max_size=4).map(
        lambda extra: {**base, **extra}
    )
)
text_messages = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]),
                           "content": st.text(max_size=30)}),
    min_size=1, max_size=3,
)  # fmt: skip
#: Valid requests with a few fields mutated: most get past the validator, some must not.
near_valid = st.builds(
    lambda msgs, extra, model: {"model": model, "messages": msgs, **extra},
    text_messages,
    st.dictionaries(st.sampled_from(sorted(CHAT_FIELDS - {"model", "messages"})), json_values,
                    max_size=2),
    st.sampled_from(["demo", "demo", "embed-small"]),
)  # fmt: skip
bodies = st.one_of(
    near_valid.map(lambda v: json.dumps(v).encode()),
    chat_like.map(lambda v: json.dumps(v).encode()),  # big ints, Infinity: stdlib json
    json_values.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=200),
    st.text(max_size=100).map(str.encode),
)
header_values = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=60
)
header_names = st.sampled_from([
    "content-type", "authorization", "x-api-key", "x-request-id", "transfer-encoding",
    "connection", "host", "cookie", "x-forwarded-for", "x-fake-status", "x-fake-hang-ms",
    "accept-encoding", "x-gateway-cache", "openai-organization",
])  # fmt: skip


def _safe_json(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None


def assert_forwarded_bodies_are_valid(gw: RunningGateway) -> None:
    for req in gw.upstream_requests():
        body = req["body"]
        assert isinstance(body, dict), req
        assert isinstance(body.get("model"), str) and body["model"], body
        assert not FORBIDDEN & set(body), body
        if req["path"].endswith("/embeddings"):
            assert "input" in body and set(body) <= EMBEDDING_FIELDS, body
            continue
        assert req["path"].endswith("/chat/completions"), req["path"]
        assert set(body) <= CHAT_FIELDS, body
        msgs = body.get("messages")
        assert isinstance(msgs, list) and msgs, body
        for m in msgs:
            assert isinstance(m, dict) and m.get("role") in ROLES, body
            content = m.get("content")
            assert content is None or isinstance(content, (str, list)), body
        assert body.get("stream") in (None, True, False), body


def check(gw: RunningGateway, resp: httpx.Response) -> None:
    assert 200 <= resp.status_code < 600
    assert resp.status_code != 500, resp.text
    if (
        resp.content
        and resp.status_code >= 400
        and resp.headers.get("content-type", "").startswith("application/json")
    ):
        err = resp.json().get("error")
        assert isinstance(err, dict) and isinstance(err.get("message"), str), resp.text


@pytest.fixture(scope="module")
def client(gw: RunningGateway) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gw.url, timeout=10) as c:
        yield c


@FUZZ
@given(route=st.sampled_from(ROUTES[:4]), body=bodies, key=st.sampled_from([USER_KEY, ADMIN_KEY]))
def test_fuzz_bodies_on_the_proxied_routes(
    gw: RunningGateway, client: httpx.Client, route: str, body: bytes, key: str
) -> None:
    resp = client.post(
        route, content=body,
        headers={"authorization": f"Bearer {key}", "content-type": "application/json"},
    )  # fmt: skip
    check(gw, resp)
    if resp.status_code == 200 and "chat" in route:
        parsed = _safe_json(body)
        assert isinstance(parsed, dict) and isinstance(parsed.get("messages"), list)


@FUZZ
@given(
    route=st.sampled_from(ROUTES),
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]),
    headers=st.dictionaries(header_names, header_values, max_size=5),
    body=bodies,
    key=st.sampled_from([USER_KEY, ADMIN_KEY, "", "sk-wrong"]),
)
def test_fuzz_methods_and_hostile_headers_on_every_route(
    gw: RunningGateway, client: httpx.Client, route: str, method: str,
    headers: dict[str, str], body: bytes, key: str,
) -> None:  # fmt: skip
    sent = {b"authorization": f"Bearer {key}".encode()} if key else {}
    sent.update({k.encode(): v.encode("latin-1") for k, v in headers.items()})
    try:
        resp = client.request(method, route, content=body, headers=sent)
    except httpx.LocalProtocolError:
        reject()  # the client library refuses to send it (e.g. leading whitespace)
    except httpx.RemoteProtocolError:
        # A header h11/uvicorn itself refuses (e.g. a broken transfer-encoding) closes the
        # connection before the app runs: not a gateway answer, and not a hang.
        return
    check(gw, resp)


def test_fuzzing_never_forwarded_an_invalid_request(gw: RunningGateway) -> None:
    # Runs after the two fuzz tests (file order): the fake recorded everything they forwarded.
    forwarded = gw.upstream_requests()
    assert len(forwarded) >= 5, "the fuzzers should have produced valid requests too"
    assert len(forwarded) == gw.upstream.stats()["requests_total"]  # all of them recorded
    assert_forwarded_bodies_are_valid(gw)


# --- minimal regressions for what the fuzzers found ---------------------------------------------


def test_unhashable_role_or_part_type_is_400_not_500(gw: RunningGateway) -> None:
    # Found by the fuzzer: ``role not in ROLES`` raised TypeError for a list (fixed in validate.py).
    http = gw.http()
    for msg in ({"role": []}, {"role": "user", "content": [{"type": {"a": 1}}]}):
        resp = http.post("/v1/chat/completions", json={"model": "demo", "messages": [msg]})
        assert resp.status_code == 400, resp.text
        assert resp.json()["error"]["param"].startswith("messages[0]")


def test_non_ascii_x_api_key_beside_a_bearer_token_is_401_not_500(gw: RunningGateway) -> None:
    # Found by the fuzzer: hmac.compare_digest(str, str) raises TypeError on non-ASCII text
    # (plugins/auth/plugin.py ``credential``); any route with auth answered 500.
    headers = [(b"authorization", f"Bearer {USER_KEY}".encode()), (b"x-api-key", b"\xe9")]
    with httpx.Client(base_url=gw.url, timeout=10) as c:
        for route in ("/v1/chat/completions", "/v1/models", "/metrics"):
            resp = c.request(
                "POST" if "chat" in route else "GET",
                route,
                headers=headers,
                json={"model": "demo", "messages": [{"role": "user", "content": "x"}]},
            )
            assert resp.status_code == 401, (route, resp.status_code)
