"""Configuration: every mistake fails at startup naming the file, the key and what is allowed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gateway.config import ConfigError, load_settings, parse_settings

ROOT = Path(__file__).resolve().parent.parent
MODEL = {"name": "m", "deployments": [{"model": "x", "base_url": "http://127.0.0.1:1/v1"}]}


def fails(raw: Any, env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as exc:
        parse_settings(raw, "cfg.yaml", env or {})
    return str(exc.value)


def test_shipped_config_is_valid() -> None:
    settings = load_settings(ROOT / "config.yaml", env={})
    assert settings.models[0].name == "demo"
    assert settings.demo_upstream.enabled


def test_unknown_top_level_key_names_allowed_keys() -> None:
    msg = fails({"models": [MODEL], "sever": {}})
    assert msg.startswith("cfg.yaml: (top level): unknown key 'sever'; allowed keys: ")
    assert "server" in msg and "pipeline" in msg


def test_wrong_type_names_the_path_and_value() -> None:
    msg = fails({"models": [MODEL], "server": {"port": "eighty"}})
    assert "cfg.yaml: server.port: Input should be a valid integer" in msg
    assert "'eighty'" in msg


def test_nested_list_paths() -> None:
    bad = {"name": "m", "deployments": [{"model": "x", "base_url": "ftp://h"}]}
    msg = fails({"models": [bad]})
    assert "cfg.yaml: models[0].deployments[0].base_url: must start with http:// or https://" in msg


def test_unknown_provider_lists_providers() -> None:
    bad = {"name": "m", "deployments": [{"provider": "bard", "model": "x", "base_url": "http://h"}]}
    msg = fails({"models": [bad]})
    assert (
        "models[0].deployments[0].provider: unknown provider 'bard'; allowed: anthropic, openai"
        in msg
    )


def test_literal_errors_list_allowed_values() -> None:
    msg = fails({"models": [MODEL], "logging": {"level": "loud"}})
    assert "logging.level" in msg and "'debug'" in msg and "'error'" in msg


def test_missing_env_var_is_named() -> None:
    raw = {"models": [{"name": "m", "deployments": [
        {"model": "x", "base_url": "http://h", "api_key": "${OPENAI_API_KEY}"}]}]}  # fmt: skip
    msg = fails(raw)
    assert msg.startswith(
        "cfg.yaml: models[0].deployments[0].api_key: environment variable OPENAI_API_KEY is not set"
    )


def test_env_vars_and_defaults_are_substituted() -> None:
    raw = {
        "models": [
            {
                "name": "m",
                "deployments": [
                    {
                        "model": "x",
                        "base_url": "${BASE:-http://127.0.0.1:9}/v1",
                        "api_key": "${KEY}",
                    }
                ],
            }
        ]
    }
    s = parse_settings(raw, "cfg.yaml", {"KEY": "sk-123"})
    dep = s.models[0].deployments[0]
    assert dep.api_key == "sk-123" and dep.base_url == "http://127.0.0.1:9/v1"
    assert "sk-123" not in repr(dep)  # secrets stay out of reprs and logs


def test_duplicate_model_names_and_unknown_fallbacks() -> None:
    assert "already used" in fails({"models": [MODEL, MODEL]})
    bad = {**MODEL, "fallbacks": ["ghost"]}
    assert "models[0].fallbacks: unknown model 'ghost'" in fails({"models": [bad]})


def test_models_are_required() -> None:
    assert "models" in fails({})


def test_check_config_command(tmp_path: Path) -> None:
    ok = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway.cli",
            "check-config",
            "--config",
            str(ROOT / "config.yaml"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert ok.returncode == 0, ok.stderr
    assert "OK" in ok.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("models:\n  - name: m\n    deployments: []\npipeline:\n  - name: nope\n")
    r = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "check-config", "--config", str(bad)],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert r.returncode == 2
    assert f"{bad}: models[0].deployments" in r.stderr
    assert "Traceback" not in r.stderr
    missing = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway.cli",
            "check-config",
            "--config",
            str(tmp_path / "no.yaml"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert missing.returncode == 2 and "cannot read config file" in missing.stderr
