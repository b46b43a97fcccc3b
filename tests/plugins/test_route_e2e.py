"""The route plugin end to end: the real gateway, the fake upstream playing OpenAI, Anthropic and
a local OpenAI-compatible server, and the official openai SDK."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import httpx
import openai
import orjson
import pytest

from gateway.context import Identity
from gateway.fake_upstream import STATE
from gateway.plugin import Plugin
from tests.helpers import free_port, running_gateway

MSG = [{"role": "user", "content": "hello there"}]


class TierFromHeader(Plugin):
    """Test-only stand-in for auth: the caller's tier and roles come from headers."""

    name = "tier"

    async def on_request(self, ctx: Any) -> None:
        tier = ctx.headers.get("x-test-tier")
        if tier:
            roles = tuple(r for r in ctx.headers.get("x-test-roles", "").split(",") if r)
            ctx.identity = Identity(user="u1", tier=tier, roles=roles)


def dep(url: str, dep_id: str, model: str, **kw: Any) -> dict[str, Any]:
    d = {"id": dep_id, "provider": "openai", "model": model, "base_url": f"{url}/v1",
         "api_key": "sk-provider-CANARY"}  # fmt: skip
    d.update(kw)
    return d


def three_providers(
    url: str, route: dict[str, Any] | None = None, primary_url: str = ""
) -> dict[str, Any]:
    """``smart`` (OpenAI, two sizes) → ``claude`` (Anthropic) → ``local`` (keyless server)."""
    return {
        "models": [
            {
                "name": "smart",
                "deployments": [
                    dep(primary_url or url, "smart-large", "large-up", weight=1,
                        price={"input_per_mtok": 10, "output_per_mtok": 30}),
                    dep(url, "smart-small", "small-up", weight=1,
                        price={"input_per_mtok": 0.1, "output_per_mtok": 0.4}),
                ],
                "fallbacks": ["claude"],
            },
            {
                "name": "claude",
                "deployments": [
                    dep(url, "claude-a", "claude-up", provider="anthropic", api_key="sk-ant-CANARY")
                ],
                "fallbacks": ["local"],
            },
            {"name": "local", "deployments": [dep(url, "local-a", "local-up", api_key="")]},
        ],
        "pipeline": [
            {"name": "tier"},
            {"name": "route", "config": route or {}},
        ],
        "upstream": {"first_byte_timeout_s": 0.5, "response_timeout_s": 0.5},
        "logging": {"request_log": "none"},
    }  # fmt: skip


def ask_smart(client: Any, stream: bool) -> tuple[Any, str]:
    """``smart`` asked for the test message, streamed or not: the raw response and its text."""
    resp = client.chat.completions.with_raw_response.create(
        model="smart", messages=MSG, stream=stream
    )
    if stream:
        return resp, "".join(c.choices[0].delta.content or "" for c in resp.parse() if c.choices)
    return resp, resp.parse().choices[0].message.content


def models_called(gw: Any) -> list[str]:
    return [r["body"]["model"] for r in gw.upstream_requests()]


def one_deployment_then_fallback(route: dict[str, Any] | None = None):  # type: ignore[no-untyped-def]
    """``smart`` has only ``smart-large``; fallbacks: claude → local."""

    def build(url: str) -> dict[str, Any]:
        cfg = three_providers(url, route)
        cfg["models"][0]["deployments"] = cfg["models"][0]["deployments"][:1]
        return cfg

    return build


TIER_RULES = {
    "rules": [
        {"name": "free", "when": {"tiers": ["free"], "models": ["smart"]},
         "deployments": ["smart-small"]},
        {"name": "pro", "when": {"tiers": ["pro"]}, "deployments": ["smart-large"]},
    ]
}  # fmt: skip


def test_tier_rule_free_gets_cheap_pro_gets_large() -> None:
    with running_gateway(
        lambda u: three_providers(u, TIER_RULES), registry={"tier": TierFromHeader}
    ) as gw:
        client = gw.openai()
        for _ in range(5):
            r = client.chat.completions.with_raw_response.create(
                model="smart", messages=MSG, extra_headers={"x-test-tier": "free"}
            )
            assert r.headers["x-gateway-deployment"] == "smart-small"
        for _ in range(5):
            r = client.chat.completions.with_raw_response.create(
                model="smart", messages=MSG, extra_headers={"x-test-tier": "pro"}
            )
            assert r.headers["x-gateway-deployment"] == "smart-large"
            assert r.parse().choices[0].message.content == "Echo: hello there"
        assert models_called(gw) == ["small-up"] * 5 + ["large-up"] * 5


def test_cheapest_rule_picks_lowest_price_and_capability_filter() -> None:
    route = {"rules": [{"name": "cost", "when": {"tools": False}, "cheapest": True}]}

    def build(url: str) -> dict[str, Any]:
        cfg = three_providers(url, route)
        cfg["models"][0]["deployments"][1]["capabilities"] = ["streaming"]  # small: no tools
        return cfg

    with running_gateway(build, registry={"tier": TierFromHeader}) as gw:
        client = gw.openai()
        for _ in range(4):
            r = client.chat.completions.with_raw_response.create(model="smart", messages=MSG)
            assert r.headers["x-gateway-deployment"] == "smart-small"
        tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
        r = client.chat.completions.with_raw_response.create(
            model="smart", messages=MSG, tools=tools
        )
        assert r.headers["x-gateway-deployment"] == "smart-large"  # the only one with tools


def test_context_window_moves_to_larger_deployment() -> None:
    def build(url: str) -> dict[str, Any]:
        cfg = three_providers(url)
        cfg["models"][0]["deployments"][1]["context_window"] = 50
        cfg["models"][0]["deployments"][0]["context_window"] = 50
        return cfg

    with running_gateway(build, registry={"tier": TierFromHeader}) as gw:
        client = gw.openai()
        long = [{"role": "user", "content": "word " * 200}]
        r = client.chat.completions.with_raw_response.create(model="smart", messages=long)
        assert r.headers["x-gateway-deployment"] == "claude-a"  # 128k window by default
        assert models_called(gw) == ["claude-up"]


@pytest.mark.parametrize(
    ("behaviour", "stream"),
    [
        ({"status": 503}, False),
        ({"status": 503}, True),
        ({"status": 429, "retry_after": "30"}, False),
        ({"hang_ms": 5000}, True),
        ({"hang_ms": 5000}, False),
    ],
)
def test_failover_to_fallback_model(behaviour: dict[str, Any], stream: bool) -> None:
    with running_gateway(
        one_deployment_then_fallback({"deadline_s": 5}),
        registry={"tier": TierFromHeader},
        fake={"behaviours": {"large-up": behaviour}},
    ) as gw:
        client = gw.openai()
        started = time.perf_counter()
        resp, text = ask_smart(client, stream)
        assert time.perf_counter() - started < 3
        assert text == "Echo: hello there"
        assert resp.headers["x-gateway-deployment"] == "claude-a"
        assert resp.headers["x-gateway-provider"] == "anthropic"
        assert resp.headers["x-gateway-attempts"] == "2"
        assert models_called(gw) == ["large-up", "claude-up"]


def test_retry_after_keeps_deployment_out_of_rotation() -> None:
    with running_gateway(
        one_deployment_then_fallback(),
        registry={"tier": TierFromHeader},
        fake={"behaviours": {"large-up": {"status": 429, "retry_after": "30"}}},
    ) as gw:
        client = gw.openai()
        for _ in range(3):
            client.chat.completions.create(model="smart", messages=MSG)
        # The 429 asked for 30 s: the primary was called once, then left alone.
        assert models_called(gw) == ["large-up", "claude-up", "claude-up", "claude-up"]


def test_short_retry_after_is_waited_out_on_the_only_deployment() -> None:
    def build(url: str) -> dict[str, Any]:
        return {"models": [{"name": "solo", "deployments": [dep(url, "solo-a", "solo-up")]}],
                "pipeline": [{"name": "route", "config": {"max_retry_wait_s": 1}}],
                "logging": {"request_log": "none"}}  # fmt: skip

    with running_gateway(build) as gw:
        state = gw.upstream.runner.app[STATE]
        state.behaviours["solo-up"] = {"status": 429, "retry_after": "1"}
        client = gw.openai()

        def heal() -> None:
            # Heal once the first (429) attempt has arrived, however long that took.
            deadline = time.monotonic() + 5
            while not state.requests and time.monotonic() < deadline:
                time.sleep(0.01)
            state.behaviours["solo-up"] = {}

        import threading

        t = threading.Thread(target=heal)
        t.start()
        started = time.perf_counter()
        r = client.chat.completions.with_raw_response.create(model="solo", messages=MSG)
        t.join()
        assert 0.9 < time.perf_counter() - started < 3
        assert r.headers["x-gateway-attempts"] == "2"
        assert models_called(gw) == ["solo-up", "solo-up"]


def test_connection_refused_fails_over() -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with running_gateway(
        lambda u: _with_dead_primary(u, dead), registry={"tier": TierFromHeader}
    ) as gw:
        r = gw.openai().chat.completions.with_raw_response.create(model="smart", messages=MSG)
        assert r.headers["x-gateway-deployment"] == "claude-a"
        assert r.headers["x-gateway-attempts"] == "2"


def _with_dead_primary(url: str, dead: str) -> dict[str, Any]:
    cfg = one_deployment_then_fallback()(url)
    cfg["models"][0]["deployments"][0]["base_url"] = f"{dead}/v1"
    return cfg


def test_every_provider_in_the_chain_fails_but_the_local_server() -> None:
    with running_gateway(
        one_deployment_then_fallback(),
        registry={"tier": TierFromHeader},
        fake={"behaviours": {"large-up": {"status": 500}, "claude-up": {"status": 529}}},
    ) as gw:
        r = gw.openai().chat.completions.with_raw_response.create(model="smart", messages=MSG)
        assert r.headers["x-gateway-deployment"] == "local-a"
        assert r.headers["x-gateway-attempts"] == "3"
        assert models_called(gw) == ["large-up", "claude-up", "local-up"]
        local = gw.upstream_requests()[-1]
        assert not any(k.lower() == "authorization" for k, _ in local["headers"])


def test_an_error_after_failed_attempts_says_how_many_were_made() -> None:
    """A client that got a 5xx after every deployment failed could not tell one try from
    three: errors carried no ``x-gateway-attempts``. Refusals before any attempt still don't."""
    with running_gateway(
        one_deployment_then_fallback(),
        registry={"tier": TierFromHeader},
        fake={"behaviours": {m: {"status": 500} for m in ("large-up", "claude-up", "local-up")}},
    ) as gw:
        r = gw.http().post("/v1/chat/completions", json={"model": "smart", "messages": MSG})
        assert r.status_code >= 500 and r.json()["error"]["type"]
        assert r.headers["x-gateway-attempts"] == "3"
        r = gw.http().post("/v1/chat/completions", json={"model": "nope", "messages": MSG})
        assert r.status_code == 404 and "x-gateway-attempts" not in r.headers


def test_all_failing_gives_last_error_and_request_errors_are_not_retried() -> None:
    with running_gateway(
        one_deployment_then_fallback(),
        registry={"tier": TierFromHeader},
        fake={"behaviours": {"large-up": {"status": 400}}},
    ) as gw:
        client = gw.openai()
        errors = upstream_errors(gw, "smart-large")
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="smart", messages=MSG)
        assert models_called(gw) == ["large-up"]  # a 400 is the request's fault: no failover
        assert upstream_errors(gw, "smart-large") == errors  # and no error of the deployment


def test_failure_after_first_chunk_is_an_sse_error_without_switching() -> None:
    with running_gateway(
        one_deployment_then_fallback(),
        registry={"tier": TierFromHeader},
        fake={"behaviours": {"large-up": {"drop_after": 2}}},
    ) as gw:
        body = {"model": "smart", "messages": MSG, "stream": True}
        with gw.http() as http, http.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            raw = r.read().decode()
        events = [e.removeprefix("data: ") for e in raw.strip().split("\n\n")]
        assert "error" in orjson.loads(events[-1])
        assert "[DONE]" not in events
        assert models_called(gw) == ["large-up"]


def metric(gw: Any, dep_id: str) -> float:
    text = httpx.get(f"{gw.url}/metrics").text
    line = next(ln for ln in text.splitlines()
                if ln.startswith(f'gateway_circuit_state{{deployment="{dep_id}"}}'))  # fmt: skip
    return float(line.rsplit(" ", 1)[1])


def test_breaker_opens_skips_primary_and_recovers_after_cooldown() -> None:
    route = {"breaker": {"failures": 2, "cooldown_s": 0.5}}
    with running_gateway(
        one_deployment_then_fallback(route),
        registry={"tier": TierFromHeader},
        fake={"behaviours": {"large-up": {"status": 503}}},
    ) as gw:
        client = gw.openai()
        for _ in range(4):
            r = client.chat.completions.with_raw_response.create(model="smart", messages=MSG)
            assert r.headers["x-gateway-deployment"] == "claude-a"
        # Two failures opened the breaker: the last two requests never touched the primary.
        assert models_called(gw).count("large-up") == 2
        assert metric(gw, "smart-large") == 1.0
        route_plugin = gw.gateway.pipeline.find("route")
        assert route_plugin.health()["deployments"]["smart-large"]["state"] == "open"
        gw.upstream.runner.app[STATE].behaviours["large-up"] = {}  # the primary heals
        time.sleep(0.6)
        assert metric(gw, "smart-large") == 2.0  # scraped before anything asked the breaker
        assert route_plugin.health()["deployments"]["smart-large"]["state"] == "half_open"
        r = client.chat.completions.with_raw_response.create(model="smart", messages=MSG)
        assert r.headers["x-gateway-deployment"] == "smart-large"  # the probe
        assert metric(gw, "smart-large") == 0.0
        r = client.chat.completions.with_raw_response.create(model="smart", messages=MSG)
        assert r.headers["x-gateway-deployment"] == "smart-large"


def test_weighted_balancing_spreads_by_weight() -> None:
    def build(url: str) -> dict[str, Any]:
        cfg = three_providers(url)
        cfg["models"][0]["deployments"][0]["weight"] = 3
        return cfg

    n = 200
    with running_gateway(build, registry={"tier": TierFromHeader}, fake={"record": 1000}) as gw:
        client = gw.openai()
        for _ in range(n):
            client.chat.completions.create(model="smart", messages=MSG)
        counts = Counter(models_called(gw))
    # Expected 75 % / 25 %; the tolerance is 3.2 standard deviations of a binomial(200, 0.75).
    assert abs(counts["large-up"] / n - 0.75) < 0.1
    assert counts["large-up"] + counts["small-up"] == n


def test_pinning_needs_an_allowed_role() -> None:
    with running_gateway(three_providers, registry={"tier": TierFromHeader}) as gw:
        client = gw.openai()
        pin = {"x-gateway-deployment": "smart-small", "x-test-tier": "pro"}
        with pytest.raises(openai.PermissionDeniedError):
            client.chat.completions.create(model="smart", messages=MSG, extra_headers=pin)
        assert models_called(gw) == []
        for _ in range(3):
            r = client.chat.completions.with_raw_response.create(
                model="smart", messages=MSG, extra_headers={**pin, "x-test-roles": "admin"}
            )
            assert r.headers["x-gateway-deployment"] == "smart-small"
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(
                model="smart", messages=MSG,
                extra_headers={**pin, "x-test-roles": "admin", "x-gateway-deployment": "nope"},
            )  # fmt: skip


@pytest.mark.parametrize("stream", [False, True])
def test_deadline_bounds_the_whole_request(stream: bool) -> None:
    """Every deployment hangs longer than the deadline: a 504 at the deadline, not after the
    (longer) first-byte timeout of each attempt."""

    def build(url: str) -> dict[str, Any]:
        cfg = one_deployment_then_fallback({"deadline_s": 0.8, "plain_deadline_s": 0.8})(url)
        cfg["upstream"] = {"first_byte_timeout_s": 10, "response_timeout_s": 10}
        return cfg

    with running_gateway(build, registry={"tier": TierFromHeader},
                         fake={"hang_ms": 5000}) as gw:  # fmt: skip
        started = time.perf_counter()
        with pytest.raises(openai.APIStatusError) as exc:
            resp = gw.openai().chat.completions.create(model="smart", messages=MSG, stream=stream)
            list(resp) if stream else None  # type: ignore[call-overload]
        elapsed = time.perf_counter() - started
        assert exc.value.status_code == 504
        assert 0.7 < elapsed < 2.0
        health = gw.gateway.pipeline.find("route").health()["deployments"]
        if not stream:
            # A plain answer's first byte comes with the whole answer: the first attempt gets
            # all the time, and the deadline cutting it is its failure (it had all of it).
            assert models_called(gw) == ["large-up"]
            assert health["smart-large"]["consecutive_failures"] == 1
            assert health["claude-a"]["consecutive_failures"] == 0
            return
        # Each streamed attempt with another after it gets half the time left (0.4 s, then
        # 0.2 s): a cut there is its deployment's failure; the last one started with under a
        # quarter of the request's time, so the deadline cutting it is not its fault.
        assert models_called(gw) == ["large-up", "claude-up", "local-up"]
        assert health["smart-large"]["consecutive_failures"] == 1
        assert health["claude-a"]["consecutive_failures"] == 1
        assert health["local-a"]["consecutive_failures"] == 0


def test_fallbacks_and_rules_never_take_a_caller_to_a_model_its_roles_do_not_grant() -> None:
    from tests.plugins.test_auth_support import ADMIN_KEY, USER_KEY, base_config

    dead = f"http://127.0.0.1:{free_port()}"

    def config(url: str) -> dict[str, Any]:
        return {
            "models": [
                # The user's model fails (nothing listens) and falls back to a model only
                # admins are granted.
                {"name": "demo", "deployments": [dep(dead, "demo-dead", "demo-up")],
                 "fallbacks": ["o1-secret"]},
                {"name": "o1-secret", "deployments": [dep(url, "secret-0", "o1-up")]},
                {"name": "gpt-tools", "deployments": [dep(url, "tools-0", "tools-up")],
                 "fallbacks": ["o1-secret"]},
            ],
            "pipeline": [
                {"name": "auth", "config": base_config()},
                {"name": "route", "config": {"rules": [
                    # Requests with tools go to the secret model (when the caller may use it).
                    {"name": "tools", "when": {"tools": True}, "model": "o1-secret"},
                    {"name": "pinned", "when": {"stream": True}, "deployments": ["secret-0"]},
                ]}},
            ],
            "logging": {"request_log": "none"},
        }  # fmt: skip

    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    with running_gateway(config) as gw:
        user, admin = gw.openai(api_key=USER_KEY), gw.openai(api_key=ADMIN_KEY)
        with pytest.raises(openai.APIStatusError) as info:
            user.chat.completions.create(model="demo", messages=MSG)
        assert info.value.status_code == 502  # demo failed; o1-secret was not tried
        assert gw.upstream_requests() == []
        r = admin.chat.completions.create(model="demo", messages=MSG)
        assert r.choices[0].message.content.startswith("Echo:")
        assert gw.upstream_requests()[-1]["body"]["model"] == "o1-up"
        gw.upstream.clear()
        # A rule's target model and a rule's deployments: only those the caller is granted.
        user.chat.completions.create(model="gpt-tools", messages=MSG, tools=tools)
        assert gw.upstream_requests()[-1]["body"]["model"] == "tools-up"
        admin.chat.completions.create(model="gpt-tools", messages=MSG, tools=tools)
        assert gw.upstream_requests()[-1]["body"]["model"] == "o1-up"
        list(user.chat.completions.create(model="gpt-tools", messages=MSG, stream=True))
        assert gw.upstream_requests()[-1]["body"]["model"] == "tools-up"
        list(admin.chat.completions.create(model="gpt-tools", messages=MSG, stream=True))
        assert gw.upstream_requests()[-1]["body"]["model"] == "o1-up"


def upstream_errors(gw: Any, dep_id: str) -> float:
    text = httpx.get(f"{gw.url}/metrics").text
    prefix = f'gateway_upstream_errors_total{{deployment="{dep_id}"'
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines() if ln.startswith(prefix))


def test_a_plain_answer_cut_after_its_headers_fails_over_and_counts_against_the_deployment() -> (
    None
):
    """200 and headers, then the body stops after 3 bytes: nothing reached the client, so the
    next deployment answers; the cut is the first deployment's failure."""
    with running_gateway(
        one_deployment_then_fallback(),
        registry={"tier": TierFromHeader},
        fake={"behaviours": {"large-up": {"drop_after": 3}}},
    ) as gw:
        errors = upstream_errors(gw, "smart-large")  # (the counters are the process's)
        r = gw.openai().chat.completions.with_raw_response.create(model="smart", messages=MSG)
        assert r.parse().choices[0].message.content == "Echo: hello there"
        assert r.headers["x-gateway-deployment"] == "claude-a"
        assert r.headers["x-gateway-attempts"] == "2"
        assert models_called(gw) == ["large-up", "claude-up"]
        health = gw.gateway.pipeline.find("route").health()["deployments"]
        assert health["smart-large"]["consecutive_failures"] == 1
        assert upstream_errors(gw, "smart-large") == errors + 1


def test_a_stream_failing_midway_counts_against_the_deployment_that_served() -> None:
    with running_gateway(
        one_deployment_then_fallback({"breaker": {"failures": 2, "cooldown_s": 30}}),
        registry={"tier": TierFromHeader},
        fake={"behaviours": {"large-up": {"drop_after": 2}}},
    ) as gw:
        body = {"model": "smart", "messages": MSG, "stream": True}
        errors = upstream_errors(gw, "smart-large")  # (the counters are the process's)
        for _ in range(2):
            with gw.http() as http, http.stream("POST", "/v1/chat/completions", json=body) as r:
                assert "error" in r.read().decode().strip().split("\n\n")[-1]
        route = gw.gateway.pipeline.find("route")
        # (the response phase, which tells the breaker, runs after the last byte went out: the
        # client may be faster)
        deadline = time.monotonic() + 5
        while route.health()["deployments"]["smart-large"]["state"] != "open":
            assert time.monotonic() < deadline, route.health()
            time.sleep(0.02)
        assert upstream_errors(gw, "smart-large") == errors + 2
        # The breaker is open: the next request goes straight to the fallback.
        r = gw.openai().chat.completions.with_raw_response.create(model="smart", messages=MSG)
        assert r.headers["x-gateway-deployment"] == "claude-a"


def test_a_deployment_that_cannot_express_the_request_passes_it_on() -> None:
    """Anthropic has no ``n > 1``: a request for ``claude`` (fallback: ``local``) is served by
    the local server instead of a 400, and the Anthropic deployment is not blamed; with no
    deployment left that can serve it, the 400 reaches the client."""

    def alone(url: str) -> dict[str, Any]:
        cfg = three_providers(url)
        cfg["models"][1]["fallbacks"] = []
        return cfg

    with running_gateway(three_providers, registry={"tier": TierFromHeader}) as gw:
        errors = upstream_errors(gw, "claude-a")
        r = gw.openai().chat.completions.with_raw_response.create(model="claude", messages=MSG, n=2)
        assert r.headers["x-gateway-deployment"] == "local-a"
        # Skipped, not attempted: nothing was sent to claude-a, and nothing failed there.
        assert r.headers["x-gateway-attempts"] == "1"
        assert upstream_errors(gw, "claude-a") == errors
        assert models_called(gw) == ["local-up"]  # the translation failed before sending
        health = gw.gateway.pipeline.find("route").health()["deployments"]
        assert health["claude-a"]["state"] == "closed"
        assert health["claude-a"]["consecutive_failures"] == 0
    with running_gateway(alone, registry={"tier": TierFromHeader}) as gw:
        with pytest.raises(openai.BadRequestError, match="n > 1 is not supported"):
            gw.openai().chat.completions.create(model="claude", messages=MSG, n=2)
        assert models_called(gw) == []
