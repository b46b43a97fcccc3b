"""Factories shared by the auth tests (imported by the other test_auth_* files), plus the tests of
the key primitives they rely on."""

from __future__ import annotations

import functools
import os
import re
import secrets
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from gateway.context import RequestContext
from plugins.auth import AuthPlugin
from plugins.auth.config import AuthConfig
from plugins.auth.keys import hash_key, key_prefix, mint_key

SECRET = "test-secret-0123456789abcdef"
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/15")

USER_KEY = "sk-test-UserKeyAaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
ADMIN_KEY = "sk-test-AdminKeyBbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"
OFF_KEY = "sk-test-DisabledKeyCcccccccccccccccccccccccccccccc"
OLD_KEY = "sk-test-ExpiredKeyDddddddddddddddddddddddddddddddd"

ROLES = {
    "user": {"models": ["demo", "gpt-*"], "endpoints": ["chat", "embeddings", "models"]},
    "embedder": {"models": ["embed-*"], "endpoints": ["embeddings"]},
    "admin": {"models": ["*"], "endpoints": ["*"], "admin": True},
}


def key_entry(key: str, key_id: str, **extra: Any) -> dict[str, Any]:
    return {
        "id": key_id,
        "hash": hash_key(SECRET.encode(), key).hex(),
        "prefix": key_prefix(key),
        "user": f"{key_id}-user",
        "tenant": "acme",
        "roles": ["user"],
        "tier": "free",
        **extra,
    }


def base_config(**overrides: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "key_secret": SECRET,
        "keys": [
            key_entry(USER_KEY, "user1"),
            key_entry(ADMIN_KEY, "admin1", roles=["admin", "user"], tier="pro"),
            key_entry(OFF_KEY, "off1", disabled=True),
            key_entry(OLD_KEY, "old1", expires_at="2020-01-01T00:00:00Z"),
        ],
        "roles": ROLES,
    }
    cfg.update(overrides)
    return cfg


def make_plugin(**overrides: Any) -> AuthPlugin:
    return AuthPlugin(AuthConfig.model_validate(base_config(**overrides)))


def make_ctx(
    headers: dict[str, str] | None = None,
    *,
    endpoint: str = "chat",
    model: str = "demo",
    path: str | None = None,
) -> RequestContext:
    paths = {
        "chat": "/v1/chat/completions",
        "embeddings": "/v1/embeddings",
        "models": "/v1/models",
        "admin": "/admin/keys",
        "metrics": "/metrics",
    }
    hdrs = {k.lower(): v for k, v in (headers or {}).items()}
    return RequestContext(
        request_id="req-test",
        endpoint=endpoint,
        path=path or paths.get(endpoint, "/"),
        method="POST",
        headers=hdrs,
        raw_headers=list(hdrs.items()),
        body={},
        model=model,
    )


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@functools.cache
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@functools.cache
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def public_pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def unique_prefix() -> str:
    return f"gwtest:{secrets.token_hex(6)}:"


# -- tests of the key primitives -----------------------------------------------------------------


def test_minted_keys_are_long_random_and_labelled() -> None:
    keys = {mint_key("demo") for _ in range(50)}
    assert len(keys) == 50
    for key in keys:
        assert re.fullmatch(r"sk-demo-[A-Za-z0-9]{43}", key)


def test_prefix_shows_label_and_four_characters_never_a_third_of_a_short_key() -> None:
    assert key_prefix("sk-demo-AbCdEfGhIjKlMnOpQrStUvWxYz0123456789") == "sk-demo-AbCd"
    assert key_prefix("abcdefghijkl") == "abcd"


def test_hash_is_keyed_by_the_secret() -> None:
    assert hash_key(b"secret-one-16bytes", "k") != hash_key(b"secret-two-16bytes", "k")
    assert hash_key(b"secret-one-16bytes", "k") == hash_key(b"secret-one-16bytes", "k")
    assert len(hash_key(b"secret-one-16bytes", "k")) == 32
