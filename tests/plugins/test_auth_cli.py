"""``gateway keys create|hash`` (``plugins.auth.cli.keys_main``)."""

from __future__ import annotations

import asyncio
import io
import re
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from gateway.context import Identity
from plugins.auth import AuthPlugin
from plugins.auth.cli import keys_main, parse_duration
from plugins.auth.config import AuthConfig
from tests.plugins.test_auth_support import (
    REDIS_URL,
    ROLES,
    SECRET,
    bearer,
    make_ctx,
    unique_prefix,
)


def run(argv: list[str], stdin: str = "") -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    rc = keys_main(argv, stdin=io.StringIO(stdin), stdout=out, stderr=err)
    return rc, out.getvalue(), err.getvalue()


def authenticate(plugin: AuthPlugin, key: str) -> Identity:
    async def go() -> Identity:
        ctx = make_ctx(bearer(key))
        await plugin.open(None)
        try:
            await plugin.on_request(ctx)
        finally:
            await plugin.shutdown()
        assert ctx.identity is not None
        return ctx.identity

    return asyncio.run(go())


def test_create_prints_the_key_once_and_a_working_config_entry(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("GATEWAY_KEY_SECRET", SECRET)
    rc, out, err = run(
        [
            "create",
            "--user",
            "alice",
            "--tenant",
            "acme",
            "--roles",
            "user,admin",
            "--tier",
            "pro",
            "--id",
            "alice1",
            "--label",
            "prod",
            "--expires-in",
            "30d",
        ]
    )
    assert rc == 0, err
    keys = re.findall(r"sk-prod-[A-Za-z0-9]{43}", out)
    assert len(keys) == 1  # the key appears exactly once
    snippet = out.split("`keys:`", 1)[1]
    entry = yaml.safe_load(snippet)[0]
    assert entry["id"] == "alice1" and entry["roles"] == ["user", "admin"]
    # Pasted as printed under the shipped config.yaml's `keys:` it is valid YAML (it was
    # indented 6 where the file's keys are at 8).
    shipped = (Path(__file__).resolve().parents[2] / "config.yaml").read_text()
    at = shipped.index("      keys:\n") + len("      keys:\n")
    pasted = yaml.safe_load(shipped[:at] + snippet.lstrip("\n") + shipped[at:])
    auth = next(p for p in pasted["pipeline"] if p["name"] == "auth")
    assert [k["id"] for k in auth["config"]["keys"]][:1] == ["alice1"]
    assert entry["prefix"] == keys[0][:12] and entry["expires_at"].startswith("20")
    plugin = AuthPlugin(
        AuthConfig.model_validate({"key_secret": SECRET, "keys": [entry], "roles": ROLES})
    )
    ident = authenticate(plugin, keys[0])
    assert (ident.user, ident.tenant, ident.tier, ident.credential_id) == (
        "alice",
        "acme",
        "pro",
        "alice1",
    )


def test_create_without_a_secret_fails_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GATEWAY_KEY_SECRET", raising=False)
    rc, out, err = run(["create", "--user", "x"])
    assert rc == 2 and out == ""
    assert "set GATEWAY_KEY_SECRET (16+ bytes) or pass --config config.yaml" in err


def test_hash_reads_the_key_from_stdin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_KEY_SECRET", "demo-secret-change-me")
    rc, out, err = run(["hash"], stdin="sk-demo-LocalOnlyNeverDeployThisKey\n")
    assert rc == 0
    assert "hash: 0a11b5fcf6d6b82d3ea096ea143d0c21b7ba0230e72d78f5ef82956dd86ea121" in out
    assert "prefix: sk-demo-Loc" in out
    assert "demo key secret" in err


def write_config(tmp_path: Path, auth: dict[str, Any]) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({
        "models": [{"name": "demo", "deployments": [{"model": "m",
                                                     "base_url": "http://127.0.0.1:1"}]}],
        "pipeline": [{"name": "auth", "config": auth}],
    }))  # fmt: skip
    return str(path)


def test_create_with_config_checks_roles(tmp_path: Path) -> None:
    cfg = write_config(
        tmp_path,
        {
            "key_secret": SECRET,
            "roles": ROLES,
            "keys": [{"id": "a", "hash": "0" * 64, "user": "a"}],
        },
    )
    rc, _, err = run(["create", "--config", cfg, "--user", "x", "--roles", "root"])
    assert rc == 2 and "unknown role 'root'" in err


def test_create_into_the_redis_store(tmp_path: Path) -> None:
    prefix = unique_prefix()
    auth = {
        "key_secret": SECRET,
        "roles": ROLES,
        "store": {"type": "redis", "url": REDIS_URL, "prefix": prefix},
    }
    try:
        rc, out, err = run(
            [
                "create",
                "--config",
                write_config(tmp_path, auth),
                "--store",
                "--user",
                "bob",
                "--id",
                "bob-cli",
            ]
        )
        assert rc == 0, err
        key = re.findall(r"sk-gw-[A-Za-z0-9]{43}", out)[0]
        ident = authenticate(AuthPlugin(AuthConfig.model_validate(auth)), key)
        assert (ident.user, ident.credential_id) == ("bob", "bob-cli")
    finally:
        r = redis.Redis.from_url(REDIS_URL)
        keys = list(r.scan_iter(match=f"{prefix}*"))
        if keys:
            r.delete(*keys)
        r.close()


def test_durations() -> None:
    assert parse_duration("90m") == 5400 and parse_duration("2d") == 172800
    with pytest.raises(Exception, match="bad duration"):
        parse_duration("soon")
