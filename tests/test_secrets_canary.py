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
