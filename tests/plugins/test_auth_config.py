"""Config validation of the auth plugin: mistakes fail at startup naming the key."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.config import ConfigError, parse_settings
from gateway.pipeline import build_pipeline
from plugins.auth import AuthPlugin
from tests.plugins.test_auth_support import SECRET, base_config, public_pem, rsa_key

MODELS = [{"name": "demo", "deployments": [{"model": "m", "base_url": "http://127.0.0.1:1"}]}]


def build(config: dict[str, Any]) -> AuthPlugin:
    settings = parse_settings(
        {"models": MODELS, "pipeline": [{"name": "auth", "config": config}]}, "config.yaml", env={}
    )
    plugins = build_pipeline(settings)
    assert isinstance(plugins[0], AuthPlugin)
    return plugins[0]


def error_of(config: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        build(config)
    return str(info.value)


def test_valid_config_builds_and_runs_on_every_endpoint() -> None:
    plugin = build(base_config())
    assert plugin.endpoints == frozenset({"*"})
    assert all(plugin.applies_to(e) for e in ("chat", "embeddings", "models", "admin", "metrics"))


def test_unknown_key_names_the_allowed_ones() -> None:
    msg = error_of(base_config(secret="x"))
    assert msg.startswith("config.yaml: pipeline[0].config: unknown key 'secret'; allowed keys:")
    assert "key_secret" in msg


def test_short_key_secret() -> None:
    assert "key_secret must be at least 16 bytes" in error_of(base_config(key_secret="short"))


def test_env_default_secret_is_substituted() -> None:
    cfg = base_config(key_secret="${GATEWAY_KEY_SECRET:-" + SECRET + "}")
    assert build(cfg).table.secret == SECRET.encode()


def test_nothing_configured_is_an_error() -> None:
    assert "no credentials configured" in error_of({"key_secret": SECRET})


def test_bad_hash() -> None:
    cfg = base_config(keys=[{"id": "a", "hash": "abc", "user": "u"}])
    assert "pipeline[0].config.keys[0].hash: must be 64 hex characters" in error_of(cfg)


def test_duplicate_key_ids() -> None:
    h = "0" * 64
    cfg = base_config(
        keys=[{"id": "a", "hash": h, "user": "u"}, {"id": "a", "hash": "1" * 64, "user": "u"}]
    )
    assert "keys[1]: duplicate id 'a'" in error_of(cfg)


def test_key_with_undefined_role() -> None:
    cfg = base_config(keys=[{"id": "a", "hash": "0" * 64, "user": "u", "roles": ["root"]}])
    assert "keys[0] (a): unknown role 'root'" in error_of(cfg)


def test_role_with_unknown_endpoint() -> None:
    cfg = base_config(roles={"user": {"endpoints": ["chat", "completions"]}})
    assert "unknown endpoint 'completions'" in error_of(cfg)


def test_jwt_alg_none_is_not_configurable() -> None:
    cfg = base_config(
        jwt={
            "enabled": True,
            "algorithms": ["none"],
            "secret": "x" * 32,
            "issuer": "i",
            "audience": "a",
        }
    )
    assert "algorithm 'none' is not allowed" in error_of(cfg)


def test_jwt_mixing_hmac_and_public_key_algorithms() -> None:
    cfg = base_config(jwt={"enabled": True, "algorithms": ["HS256", "RS256"]})
    assert "do not mix HMAC (HS*) and public-key algorithms" in error_of(cfg)


def test_jwt_short_hmac_secret() -> None:
    cfg = base_config(
        jwt={
            "enabled": True,
            "algorithms": ["HS256"],
            "secret": "short",
            "issuer": "i",
            "audience": "a",
        }
    )
    assert "jwt.secret must be at least 32 bytes" in error_of(cfg)


def test_jwt_needs_exactly_one_key_source() -> None:
    cfg = base_config(jwt={"enabled": True, "issuer": "i", "audience": "a"})
    assert "set exactly one of jwt.public_key_file, jwt.jwks_file, jwt.jwks_url" in error_of(cfg)


def test_jwt_missing_pem_file() -> None:
    cfg = base_config(
        jwt={"enabled": True, "public_key_file": "/nonexistent.pem", "issuer": "i", "audience": "a"}
    )
    assert "file not found: /nonexistent.pem" in error_of(cfg)


def test_jwt_required_issuer_and_audience() -> None:
    cfg = base_config(
        jwt={"enabled": True, "algorithms": ["HS256"], "secret": "x" * 32, "audience": "a"}
    )
    assert "jwt.issuer is required" in error_of(cfg)


def test_jwks_url_must_be_https_off_loopback() -> None:
    cfg = base_config(
        jwt={
            "enabled": True,
            "jwks_url": "http://issuer.example/jwks",
            "issuer": "i",
            "audience": "a",
        }
    )
    assert "must be an https:// URL" in error_of(cfg)


def test_pem_file_config_loads(tmp_path: Any) -> None:
    pem = tmp_path / "pub.pem"
    pem.write_bytes(public_pem(rsa_key()))
    plugin = build(
        base_config(
            jwt={"enabled": True, "public_key_file": str(pem), "issuer": "i", "audience": "a"}
        )
    )
    assert plugin.jwt is not None and list(plugin.jwt.keys) == [None]


def test_secret_is_not_in_repr() -> None:
    assert SECRET not in repr(build(base_config()).config)
