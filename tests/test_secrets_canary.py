"""No secret ever leaves: canary values for the provider key, client keys (valid and not) and a
JWT never appear in the request log, the application log, /metrics or any error body."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import jwt

from tests.helpers import demo_model, fake_upstream, spawn_gateway
from tests.plugins.test_auth_support import ADMIN_KEY, USER_KEY, base_config

PROVIDER_CANARY = "sk-provider-CANARY-0123456789"  # demo_model's api_key
BAD_KEY = "sk-test-CANARYbadKeyZzzzzzzzzzzzzzzzzzzzzzzzzzzzzz"
JWT_SECRET = "jwt-secret-CANARY-0123456789abcdef0123456789"


def test_no_key_or_token_appears_in_logs_metrics_or_errors(tmp_path: Path) -> None:
    log_file = tmp_path / "requests.jsonl"
    auth = base_config(jwt={
        "enabled": True, "algorithms": ["HS256"], "secret": JWT_SECRET,
        "issuer": "https://idp.test", "audience": "gateway",
    })  # fmt: skip
    bad_jwt = jwt.encode(
        {"sub": "mallory", "iss": "https://idp.test", "aud": "other", "exp": time.time() + 60},
        JWT_SECRET, "HS256",
    )  # fmt: skip
    with fake_upstream() as fake:
        config = {
            "models": [demo_model(fake.url)],
            "pipeline": [{"name": "auth", "config": auth}],
            "logging": {"request_log": str(log_file), "level": "debug"},
        }
        gw = spawn_gateway(config)
        bodies = []
        try:
            chat = {"model": "demo", "messages": [{"role": "user", "content": "hi"}]}
            url = f"{gw.url}/v1/chat/completions"
            ok = httpx.post(url, json=chat, headers={"authorization": f"Bearer {USER_KEY}"})
            assert ok.status_code == 200
            for headers in (
                {"authorization": f"Bearer {BAD_KEY}"},
                {"x-api-key": BAD_KEY},
                {"authorization": f"Bearer {bad_jwt}"},
                {"authorization": f"Bearer {USER_KEY}", "x-fake-status": "401"},  # upstream 401
                {"authorization": f"Bearer {USER_KEY}", "x-fake-status": "500"},
            ):
                r = httpx.post(url, json=chat, headers=headers)
                assert r.status_code >= 400
                bodies.append(r.text + str(r.headers))
            bodies.append(httpx.post(url + f"?api_key={BAD_KEY}", json=chat).text)
            metrics = httpx.get(f"{gw.url}/metrics",
                                headers={"authorization": f"Bearer {ADMIN_KEY}"})  # fmt: skip
            assert metrics.status_code == 200
            bodies.append(metrics.text)
        finally:
            assert gw.stop() == 0
        app_log = gw.output()
        request_log = log_file.read_text()
        assert len(request_log.splitlines()) == 7  # every request has its line
        assert "authentication failed" in app_log  # the reason is logged ...
        for secret in (PROVIDER_CANARY, BAD_KEY, USER_KEY, ADMIN_KEY, bad_jwt, JWT_SECRET,
                       "CANARY"):  # fmt: skip
            assert secret not in app_log, secret  # ... but never the credential
            assert secret not in request_log, secret
            for body in bodies:
                assert secret not in body, secret


def test_a_provider_key_in_the_answer_stays_out_of_the_log(tmp_path: Path) -> None:
    """An upstream that echoes the credentials it received into its answer: the client got
    ``[REDACTED]``, but the logged completion text kept the key (plain answers were scrubbed
    only on the way out; a streamed key spelt over many events is whole again in the text)."""
    import orjson

    from tests.helpers import build_config, running_gateway

    log_file = tmp_path / "requests.jsonl"
    key = "vllm-CANARY-778899"  # (a local server's key: no secret detector knows its shape)
    echo = f"your header was Bearer {key} ok"

    def config(url: str) -> dict[str, object]:
        logging = {"request_log": str(log_file), "include_text": True}
        return build_config(url, models=[demo_model(url, api_key=key)], logging=logging)

    with running_gateway(config, fake={"content": echo, "chunks": 20}) as gw:
        http = gw.http()
        chat = {"model": "demo", "messages": [{"role": "user", "content": "hi"}]}
        plain = http.post("/v1/chat/completions", json=chat)
        assert plain.status_code == 200
        content = plain.json()["choices"][0]["message"]["content"]
        assert content.startswith("your header was ") and "[REDACTED]" in content
        streamed = http.post("/v1/chat/completions", json={**chat, "stream": True})
        assert streamed.status_code == 200
    lines = [orjson.loads(line) for line in log_file.read_text().splitlines()]
    assert len(lines) == 2
    for line in lines:
        assert "completion_text" in line, line
        assert key not in orjson.dumps(line).decode(), line


def test_key_shaped_model_names_and_request_ids_are_not_logged(tmp_path: Path) -> None:
    """A key pasted into ``model`` (a 404, or a 400 before validation ended) or sent as
    ``X-Request-ID`` was written to the log as is; the requested model of a refused request
    was lost (``null``)."""
    import orjson

    from tests.helpers import running_gateway

    key = "sk-proj-" + "Q7vN2xL9pR4tK8mW3zY6bC1dF5gH0jS" + "T"
    log_file = tmp_path / "requests.jsonl"
    with running_gateway(logging={"request_log": str(log_file)}) as gw:
        http = gw.http()
        msgs = [{"role": "user", "content": "hi"}]
        assert http.post("/v1/chat/completions", json={"model": key, "messages": msgs}
                         ).status_code == 404  # fmt: skip
        bad = {"model": key, "messages": msgs, "max_tokens": "many"}
        assert http.post("/v1/chat/completions", json=bad).status_code == 400
        bad = {"model": "demo", "messages": msgs, "max_tokens": "many"}
        assert http.post("/v1/chat/completions", json=bad).status_code == 400
        r = http.post("/v1/chat/completions", json={"model": "demo", "messages": msgs},
                      headers={"x-request-id": key})  # fmt: skip
        assert r.status_code == 200 and r.headers["x-request-id"] != key
        ok = http.post("/v1/chat/completions", json={"model": "demo", "messages": msgs},
                       headers={"x-request-id": "trace-42.a"})  # fmt: skip
        assert ok.headers["x-request-id"] == "trace-42.a"
    text = log_file.read_text()
    assert key not in text and key[8:30] not in text
    lines = [orjson.loads(line) for line in text.splitlines()]
    assert [line["model"] for line in lines] == [
        "[REDACTED:api_key]",
        "[REDACTED:api_key]",
        "demo",
        "demo",
        "demo",
    ]


def test_the_output_guard_finds_a_provider_key_spelt_over_many_events() -> None:
    """One event is scrubbed by the relay, but a key the upstream spells over several events
    passed whole to the client; with the output guard it is held and redacted like any secret
    (whatever its shape: a local server's key matches no detector)."""
    from tests.helpers import build_config, running_gateway

    key = "vllm-CANARY-778899"
    echo = f"your header was Bearer {key} ok"
    guard = {"name": "guard", "config": {"semantic": {"enabled": False}}}

    def config(url: str) -> dict[str, object]:
        return build_config(url, models=[demo_model(url, api_key=key)], pipeline=[guard])

    with running_gateway(config, fake={"content": echo, "chunks": 20}) as gw:
        client = gw.openai()
        msgs = [{"role": "user", "content": "hi"}]
        text = "".join(
            c.choices[0].delta.content or ""
            for c in client.chat.completions.create(model="demo", messages=msgs, stream=True)
            if c.choices
        )
        assert key not in text and "CANARY-778899" not in text, text
        assert text == "your header was Bearer [REDACTED:credential] ok"
        plain = client.chat.completions.create(model="demo", messages=msgs)
        assert key not in (plain.choices[0].message.content or "")


def test_credentials_pattern_keeps_the_shortest_covering_strings() -> None:
    from plugins.guard.output import OutputConfig, OutputGuard

    g = OutputGuard(OutputConfig())
    g.set_credentials(["Bearer abcdefgh12345", "abcdefgh12345", "short", "other-key-999"])
    text, findings = g.check("a abcdefgh12345 b other-key-999 c short")
    assert text == "a [REDACTED:credential] b [REDACTED:credential] c short"
    assert [f.rule for f in findings] == ["credential", "credential"]


def test_only_credentials_are_scrubbed_from_answers() -> None:
    """Every deployment header value of 8+ characters, and a local server's placeholder key,
    counted as a secret: "production", "assistants=v2" or "anything" came out of ordinary
    answers as [REDACTED]. Now only credential headers' values and the key, when they look
    like secrets."""
    from gateway.providers.secrets import looks_secret
    from tests.helpers import build_config, running_gateway

    assert not looks_secret("anything") and not looks_secret("lm-studio")
    assert not looks_secret("2023-06-01") and not looks_secret("production")
    assert looks_secret("Bearer sk-proj-Q7vN2xL9pR4t") and looks_secret("Q7vN2xL9")
    azure = "Q7vN2xL9pR4tK8mW"
    headers = {"X-Environment": "production", "OpenAI-Beta": "assistants=v2", "api-key": azure}
    content = f"Deploy to production with assistants=v2; anything else? {azure}"

    def config(url: str) -> dict[str, object]:
        model = demo_model(url, api_key="anything", headers=headers)
        return build_config(url, models=[model])

    with running_gateway(config, fake={"content": content}) as gw:
        msgs = [{"role": "user", "content": "hi"}]
        text = gw.openai().chat.completions.create(model="demo", messages=msgs)
        assert text.choices[0].message.content == (
            "Deploy to production with assistants=v2; anything else? [REDACTED]"
        )
